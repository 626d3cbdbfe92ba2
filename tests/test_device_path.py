"""The code a GPU runs, run on CPU tensors: the per-step random words and the host
synchronizations of a training step."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import feedback_alignment as fa
from feedback_alignment import draws
from feedback_alignment.models import build_model

WORDS = 1 << 20  # 4 M levels: a lane's mean is known to about 1e-3 of its range


def _lanes(levels: torch.Tensor) -> torch.Tensor:
    """The four 16-bit lanes of each 64-bit word, as columns, in [0, 1)."""
    return levels.view(-1, 4).double() / (1 << 16)


@pytest.mark.parametrize("make", ["device-path", "cpu-path"])
def test_every_16_bit_lane_of_the_random_words_is_uniform(make):
    if make == "device-path":  # what a GPU runs, here on the CPU's generator
        words = draws.torch_random_words(WORDS, seed=12345, device=torch.device("cpu"))
    else:
        words = draws._random_words(WORDS, seed=12345, device=torch.device("cpu"))
    lanes = _lanes(words.view(torch.uint16).to(torch.int32))
    top_bit = (lanes >= 0.5).double().mean(0)
    assert torch.allclose(top_bit, torch.full((4,), 0.5, dtype=torch.float64), atol=0.005), top_bit
    assert torch.allclose(lanes.mean(0), torch.full((4,), 0.5, dtype=torch.float64), atol=0.003), lanes.mean(0)


@pytest.mark.parametrize("path", ["device-path", "cpu-path"])
def test_fast_uniform_is_uniform_at_every_output_position(path, monkeypatch):
    if path == "device-path":
        monkeypatch.setattr(draws, "_random_words", draws.torch_random_words)
    values = draws.fast_uniform_(torch.empty(4 * WORDS // 4), -1.0, 3.0, seed=7, layer_name="l", draw=0)
    positions = values.view(-1, 4).double()
    assert positions.min() > -1.0 and positions.max() < 3.0
    assert torch.allclose(positions.mean(0), torch.ones(4, dtype=torch.float64), atol=0.01), positions.mean(0)
    above = (positions > 1.0).double().mean(0)
    assert torch.allclose(above, torch.full((4,), 0.5, dtype=torch.float64), atol=0.005), above


class _HostReads(TorchDispatchMode):
    """Counts the operations that copy a tensor's value to the host (int(t), t.item()): on a GPU
    each one waits for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rule", fa.RULES)
def test_a_training_step_reads_nothing_back_to_the_host(rule, monkeypatch):
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_NATIVE", "0")  # the PyTorch operations a GPU runs
    from feedback_alignment import native
    native.reset()
    torch.manual_seed(0)
    scale = "match" if fa.get_rule(rule).scalable else "none"
    model = fa.convert(build_model("convnet", 4, 2, 6, True, 3, 6), rule=rule, scale=scale, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(8, 2, 6, 6), torch.randint(0, 4, (8,))
    F.cross_entropy(model(images), labels).backward()  # first step: dfa draws its B
    for step in range(2):
        with _HostReads() as reads:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            fa.mirror.mirror_step(model)
        assert reads.count == 0, (rule, step)
    native.reset()
