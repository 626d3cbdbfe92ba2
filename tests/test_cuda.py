"""The same checks on a GPU: run where CUDA is available, skipped elsewhere."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedback_alignment as fa
from feedback_alignment.models import build_model
from conftest import LAYER_RULES, scale_for, train_digits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_conv_and_linear_gradients_on_cuda_match_torch(rule):
    torch.manual_seed(0)
    conv = fa.convert(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 5)),
                      rule=rule, scale=scale_for(rule), seed=0).to(CUDA, torch.float64)
    x = torch.randn(4, 3, 32, 32, device=CUDA, dtype=torch.float64, requires_grad=True)
    hidden = conv[0](x)
    hidden.retain_grad()
    out = conv[2](conv[1](hidden))
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    linear_b = conv[2].feedback_weight.detach()
    torch.testing.assert_close(hidden.grad.flatten(1), grad_output @ linear_b)
    conv_b = conv[0].feedback_weight.detach()
    expected = torch.nn.grad.conv2d_input(x.shape, conv_b, hidden.grad, stride=2, padding=1)
    torch.testing.assert_close(x.grad, expected)
    reference = nn.Conv2d(3, 8, 3, stride=2, padding=1).to(CUDA, torch.float64)
    with torch.no_grad():
        reference.weight.copy_(conv[0].weight)
        reference.bias.copy_(conv[0].bias)
    reference(x.detach()).backward(hidden.grad)
    torch.testing.assert_close(conv[0].weight.grad, reference.weight.grad)


@pytest.mark.parametrize("rule", fa.RULES)
def test_bf16_channels_last_training_step_on_cuda(rule):
    torch.manual_seed(0)
    model = fa.convert(build_model("resnet20", 10, 3, 32), rule=rule, scale=scale_for(rule), seed=0)
    reference = copy.deepcopy(model).to(CUDA)
    model = model.to(CUDA, memory_format=torch.channels_last)
    images = torch.randn(16, 3, 32, 32, device=CUDA)
    labels = torch.randint(0, 10, (16,), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels).backward()
        F.cross_entropy(reference(images), labels).backward()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert b.grad.dtype == torch.float32 and torch.isfinite(b.grad).all(), name
        # Another layout runs other bf16 kernels: the same direction, not the same bits.
        cosine = F.cosine_similarity(a.grad.flatten().double(), b.grad.flatten().double(), dim=0)
        assert cosine > 0.95, (name, float(cosine))


def test_train_cli_on_cuda_defaults_to_bf16_and_channels_last(tmp_path):
    result = train_digits(tmp_path, "--arch", "convnet", "--depth", "3", "--rule", "brsf", "--scale", "match",
                          "--epochs", "3", "--batch-size", "64", "--device", "cuda")
    assert result["placement"]["precision"] == "bf16" and result["placement"]["channels_last"]
    assert result["provenance"]["device"].startswith("cuda")
    assert result["final_val_error"] < 30
