"""Feedback layers under bf16 autocast and torch.compile (CPU)."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import feedback_alignment as fa
from conftest import LAYER_RULES, scale_for, train_digits
from feedback_alignment.models import build_model


def _model(rule):
    torch.manual_seed(0)
    return fa.convert(build_model("convnet", num_classes=3, in_channels=2, depth=2, width=4),
                      rule=rule, scale=scale_for(rule), seed=0)


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).clamp(-1, 1)
    return float(torch.rad2deg(torch.arccos(cosine)))


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_bf16_autocast_trains_and_matches_the_bf16_reference(rule):
    model = _model(rule)
    full = copy.deepcopy(model)
    torch.manual_seed(0)
    images, labels = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits, labels)
    loss.backward()
    F.cross_entropy(full(images), labels).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    # bf16 keeps 8 bits of mantissa: the model's gradient within 3 degrees of the fp32 one
    # (0.2-1.7 degrees over three batches for every rule; a 4-entry bias alone can reach 12).
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = torch.cat([p.grad.flatten() for p in full.parameters()])
    assert _angle(gradient, reference) < 3.0
    # The classifier's input gradient must be (grad_output @ B) in bf16, as autocast would compute.
    layer = model.classifier
    x = torch.randn(4, layer.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    expected = (grad_output @ layer.feedback_weight.to(torch.bfloat16)).float()
    torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=2e-2)


# Every rule through the compiler's graph capture and autograd (aot_eager); inductor's code
# generation once, for a rule that refreshes B before every step.
@pytest.mark.parametrize("rule, backend", [(rule, "aot_eager") for rule in fa.RULES] + [("frsf", "inductor")])
def test_torch_compile_gives_the_eager_gradients(rule, backend):
    eager = _model(rule)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    images, labels = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(eager(images), labels).backward()
    F.cross_entropy(compiled(images), labels).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(fa.feedback_layers(eager), fa.feedback_layers(compiled_model)):
        torch.testing.assert_close(b.feedback_weight, a.feedback_weight, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("rule", ["brsf", "usf"])
def test_a_compiled_model_first_called_under_no_grad_refreshes_b_once_per_step(rule):
    """torch.compile skips a frame in which it traces no operation, and from then on runs that code
    eagerly: after a first call under no_grad (an evaluation, an alignment probe) the model's
    refresh pre-hook runs outside the graph. B is still refreshed once per step, as in eager mode
    (brsf drew twice: the hook, then each layer in the graph; found by running the train CLI with
    compile in the test process)."""
    torch._dynamo.reset()  # the skip is remembered per code object for the whole process
    eager = _model(rule)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    images, labels = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        compiled(images), eager(images)
    for _ in range(2):
        for model, forward in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad()
            F.cross_entropy(forward(images), labels).backward()
        for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, a), (_, b) in zip(fa.feedback_layers(eager), fa.feedback_layers(compiled_model)):
            assert int(b.feedback_draws) == int(a.feedback_draws), name
            torch.testing.assert_close(b.feedback_weight, a.feedback_weight, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("rule", fa.RULES)
def test_channels_last_gives_the_contiguous_gradients(rule):
    contiguous = _model(rule)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    images, labels = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(contiguous(images), labels).backward()
    F.cross_entropy(channels_last(images.contiguous(memory_format=torch.channels_last)), labels).backward()
    for (name, a), b in zip(contiguous.named_parameters(), channels_last.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_train_cli_under_bf16_channels_last_and_compile(tmp_path, monkeypatch):
    """The same 8 steps under bf16, channels-last and compile as in plain fp32: the same run up to
    bf16's rounding (measured: losses 2.29900 and 2.29895, test errors equal). Compiled with
    aot_eager: the training loop's use of the compiler is what is checked here; inductor's code
    for the feedback layers is checked in test_torch_compile_gives_the_eager_gradients."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    flags = ("--arch", "convnet", "--depth", "2", "--width", "8", "--rule", "frsf", "--scale", "match",
             "--epochs", "2", "--batch-size", "64", "--max-batches", "4", "--device", "cpu", "--threads", "1")
    result = train_digits(tmp_path / "bf16", *flags, "--precision", "bf16", "--channels-last", "--compile")
    reference = train_digits(tmp_path / "fp32", *flags, "--precision", "fp32")
    assert result["placement"] == dict(world_size=1, precision="bf16", channels_last=True, compile=True)
    assert result["status"] == "completed"
    assert result["final_train_loss"] == pytest.approx(reference["final_train_loss"], abs=2e-3)
    assert abs(result["final_test_error"] - reference["final_test_error"]) <= 1.0  # points: 3 of 360 images


@pytest.mark.parametrize("fill", ["uniform_", "fast_uniform_"])
def test_feedback_draws_do_not_depend_on_the_memory_layout(fill):
    from feedback_alignment import draws
    contiguous = torch.empty(64, 8, 3, 3)
    channels_last = torch.empty(64, 8, 3, 3).to(memory_format=torch.channels_last)
    for tensor in (contiguous, channels_last):
        getattr(draws, fill)(tensor, -0.5, 0.5, key=draws.draw_key(draws.layer_key(3, "conv"), 2))
    assert not channels_last.is_contiguous()
    assert torch.equal(channels_last, contiguous)


def test_brsf_redraws_in_a_channels_last_model_equal_the_contiguous_ones():
    contiguous = _model("brsf")
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    images = torch.randn(4, 2, 5, 5)
    contiguous(images), channels_last(images.contiguous(memory_format=torch.channels_last))
    for (name, a), (_, b) in zip(fa.feedback_layers(contiguous), fa.feedback_layers(channels_last)):
        assert torch.equal(b.feedback_direction, a.feedback_direction), name  # the same draw
        # The matched gain is a norm, summed in another order in the other layout.
        torch.testing.assert_close(b.feedback_weight, a.feedback_weight, rtol=1e-6, atol=0, msg=name)


def test_dfa_under_bf16_autocast_projects_the_output_error_in_bf16():
    model = _model("dfa")
    images = torch.randn(4, 2, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
        logits.retain_grad()
        loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    first = model.features[0].feedback_weight  # classes x (2 x 5 x 5)
    expected = (logits.grad.to(torch.bfloat16) @ first.to(torch.bfloat16)).float().view(images.shape)
    torch.testing.assert_close(images.grad, expected, rtol=2e-2, atol=2e-2)
