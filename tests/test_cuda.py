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


def _refreshed(model, steps=3):
    """B after `steps` refreshes (brsf: three fresh draws), as a training forward makes it."""
    from feedback_alignment.layers import refresh_ahead_of_forward
    for _ in range(steps):
        refresh_ahead_of_forward(model, ())
    return {name: layer.feedback_direction.detach().cpu() for name, layer in fa.feedback_layers(model)
            if layer.rule.write_feedback is not None and layer.feedback_direction.numel()}


@pytest.mark.parametrize("rule", fa.RULES)
def test_every_rule_draws_the_same_b_on_cuda_as_on_the_cpu(rule):
    # (seed, layer, draw index) gives one B on every device: converted on the GPU or moved there,
    # refreshed there (brsf's per-step draws), against the CPU's values, to the bit.
    torch.manual_seed(0)
    plain = build_model("resnet20", 10, 3, 32)
    scale = scale_for(rule)
    on_cpu = fa.convert(copy.deepcopy(plain), rule=rule, scale=scale, seed=4)
    converted_on_cuda = fa.convert(copy.deepcopy(plain).to(CUDA), rule=rule, scale=scale, seed=4)
    moved = copy.deepcopy(on_cpu).to(CUDA)
    expected = _refreshed(on_cpu)
    for model in (converted_on_cuda, moved):
        found = _refreshed(model)
        assert found.keys() == expected.keys()
        for name in expected:
            assert torch.equal(found[name], expected[name]), (rule, name)


def test_wm_noise_and_the_random_words_are_the_same_on_cuda():
    from feedback_alignment import draws, mirror
    key = draws.draw_key(draws.layer_key(1, "x"), 3)
    words = draws.torch_words(key, 1 << 22, CUDA)
    assert torch.equal(words.cpu(), draws.words(key, 1 << 22, torch.device("cpu")))
    lanes = words.view(torch.uint16).to(torch.int32).view(-1, 4).double() / (1 << 16)
    assert torch.allclose(lanes.mean(0).cpu(), torch.full((4,), 0.5, dtype=torch.float64), atol=0.002)
    layer = fa.convert(nn.Conv2d(4, 6, 3), rule="wm", seed=2)
    on_cuda = copy.deepcopy(layer).to(CUDA)
    assert torch.equal(mirror._noise(on_cuda, (16, 4, 10, 10)).cpu(), mirror._noise(layer, (16, 4, 10, 10)))


@pytest.mark.parametrize("constrain", [False, True])
@pytest.mark.parametrize("rule", fa.RULES)
def test_a_training_step_on_cuda_never_waits_for_the_device(rule, constrain):
    torch.manual_seed(0)
    scale = scale_for(rule)
    model = fa.convert(build_model("resnet20", 10, 3, 32), rule=rule, scale=scale, seed=0,
                       constrain_weight_norm=constrain).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(32, 3, 32, 32, device=CUDA)
    labels = torch.randint(0, 10, (32,), device=CUDA)

    def step():
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        fa.mirror.mirror_step(model)

    step()  # first step: dfa draws its B, the draw plans are made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_a_run_on_cuda_resumes_after_sigterm(tmp_path):
    # The checkpoint holds the CPU's and the GPU's RNG states; loaded to the CPU first, each is
    # restored to its device (set_state takes CPU tensors only).
    import json
    import signal

    import pandas as pd
    from test_resume import finish, interrupt_after_first_epoch, train_command
    from feedback_alignment import data

    digits = tmp_path / "digits.pt"
    data.prepare_digits(digits)
    out = tmp_path / "run"
    command = train_command(digits, out)
    command[command.index("--device") + 1] = "cuda"
    returncode, stderr = interrupt_after_first_epoch(command, out, signal.SIGTERM, 0.05)
    assert returncode == 1 and "train: SIGTERM at epoch" in stderr, stderr[-2000:]
    resumed = finish(command)
    assert "resuming from" in resumed.stderr
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert json.loads((out / "result.json").read_text())["provenance"]["device"].startswith("cuda")
