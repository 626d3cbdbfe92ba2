"""Feedback layers under bf16 autocast and torch.compile (CPU)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import feedback_alignment as fa
from feedback_alignment.models import build_model


def _model(rule):
    torch.manual_seed(0)
    return fa.convert(build_model("convnet", num_classes=3, in_channels=2, depth=2, width=4),
                      rule=rule, scale="match", seed=0)


@pytest.mark.parametrize("rule", fa.RULES)
def test_bf16_autocast_trains_and_matches_the_bf16_reference(rule):
    model = _model(rule)
    images, labels = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits, labels)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    # The classifier's input gradient must be (grad_output @ B) in bf16, as autocast would compute.
    layer = model.classifier
    x = torch.randn(4, layer.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    expected = (grad_output @ layer.feedback_weight.to(torch.bfloat16)).float()
    torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rule", ["fa", "frsf"])
def test_torch_compile_gives_the_eager_gradients(rule):
    eager = _model(rule)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="inductor")
    images, labels = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(eager(images), labels).backward()
    F.cross_entropy(compiled(images), labels).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(fa.feedback_layers(eager), fa.feedback_layers(compiled_model)):
        torch.testing.assert_close(b.feedback_weight, a.feedback_weight, rtol=1e-6, atol=0, msg=name)
