"""The code a GPU runs, run on CPU tensors: what a training step reads back to the host, and how
many operations the per-step refresh dispatches (test_draws.py has the GPU's random words)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import feedback_alignment as fa
from feedback_alignment.layers import refresh_ahead_of_forward
from feedback_alignment.models import build_model

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


class _Operations(TorchDispatchMode):
    """Counts the operations dispatched that compute something (views only relabel memory: no
    kernel runs for them on any device)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _deep_model(rule, depth, constrain):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(2, 6, 3, padding=1)] + [torch.nn.Conv2d(6, 6, 3, padding=1) for _ in range(depth)]
    model = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 4))
    scale = "match" if fa.get_rule(rule).scalable else "none"
    return fa.convert(model, rule=rule, scale=scale, seed=0, constrain_weight_norm=constrain)


@pytest.mark.parametrize("constrain", [False, True])
@pytest.mark.parametrize("rule", fa.RULES)
def test_the_refresh_of_a_model_takes_as_many_operations_for_any_number_of_layers(rule, constrain, monkeypatch):
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_NATIVE", "0")  # the PyTorch operations a GPU runs
    from feedback_alignment import native
    native.reset()
    counts = []
    for depth in (2, 12):
        model = _deep_model(rule, depth, constrain)
        refresh_ahead_of_forward(model, ())  # dfa and the first draws behind us
        with _Operations() as operations:
            refresh_ahead_of_forward(model, ())
        counts.append(operations.count)
    native.reset()
    assert counts[0] == counts[1], counts
    # about fifty for brsf, whose draw is two dozen int64 operations; a loop over layers would
    # add as many per layer
    assert counts[0] <= 60, counts
