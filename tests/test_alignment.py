"""fa.alignment.measure against hand-checkable cases: bp, the output layer, fa's alignment."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedback_alignment as fa
from conftest import FEEDBACK_RULES, scale_for
from feedback_alignment.models import build_model


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def toy_batch(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 20, generator=generator)
    teacher = torch.randn(20, 5, generator=torch.Generator().manual_seed(99))
    return inputs, (inputs @ teacher).argmax(1)


def test_bp_angles_are_zero_and_norms_equal():
    torch.manual_seed(0)
    model = fa.convert(build_model("resnet20", 4), rule="bp")
    inputs, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    frame = fa.alignment.measure(model, inputs, targets)
    assert len(frame) == 20 and frame.layer.iloc[0] == "conv1" and frame.layer.iloc[-1] == "fc"
    for column in ("angle_feedback_weight", "angle_update", "angle_signal"):
        assert frame[column].abs().max() < 1e-3, column
    assert (frame.norm_ratio - 1).abs().max() < 1e-12
    assert torch.allclose(torch.tensor(frame.grad_norm.values), torch.tensor(frame.grad_norm_bp.values))


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_output_layer_update_is_exact_under_every_rule(rule):
    model = fa.convert(mlp(), rule=rule, scale=scale_for(rule))
    frame = fa.alignment.measure(model, *toy_batch())
    last = frame.iloc[-1]
    assert last.layer == "6" and last.angle_update < 1e-4
    assert last.grad_norm == pytest.approx(last.grad_norm_bp, rel=1e-9)
    assert frame.angle_update.iloc[:-1].min() > 1.0  # hidden layers differ from backprop
    if fa.get_rule(rule).sign_concordant:
        assert frame.angle_feedback_weight.max() < 90  # positively aligned by construction


# angle(B, W) = arccos(E|W| E|R| / sqrt(E W^2 E R^2)) for B = |R| sign(W), R independent of W:
# uniform W: E|W| / sqrt(E W^2) = sqrt(3)/2, Gaussian W: sqrt(2/pi); usf's |R| is 1, brsf's and
# frsf's uniform |R| gives another sqrt(3)/2.
IMPLIED_ANGLES = {("uniform", "usf"): 30.0, ("uniform", "brsf"): 41.4, ("uniform", "frsf"): 41.4,
                  ("gaussian", "usf"): 37.0, ("gaussian", "brsf"): 46.3, ("gaussian", "frsf"): 46.3}


@pytest.mark.parametrize("init, rule", IMPLIED_ANGLES)
def test_sign_concordant_angles_are_those_the_weight_distribution_implies(init, rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 5))
    if init == "gaussian":
        for layer in model[::2]:
            nn.init.normal_(layer.weight, std=0.05)
    fa.convert(model, rule=rule, scale="match", seed=0)
    frame = fa.alignment.measure(model, torch.randn(8, 300), torch.randint(0, 5, (8,)))
    expected = IMPLIED_ANGLES[init, rule]
    assert frame.angle_feedback_weight.iloc[:2].sub(expected).abs().max() < 2.0, frame.angle_feedback_weight


def test_fa_starts_near_90_degrees_and_aligns_with_training():
    model = fa.convert(mlp(), rule="fa", scale="init", seed=1)
    probe = toy_batch(256, seed=123)
    before = fa.alignment.measure(model, *probe)
    assert before.angle_update.iloc[:2].min() > 70  # far from the output, unrelated at first
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(300):
        inputs, targets = toy_batch(64, seed=step)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    after = fa.alignment.measure(model, *probe)
    hidden = slice(0, len(after) - 1)
    assert after.angle_update.iloc[hidden].mean() < before.angle_update.iloc[hidden].mean() - 10
    assert after.angle_feedback_weight.iloc[1:].mean() < before.angle_feedback_weight.iloc[1:].mean() - 5


def test_measure_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=3, in_channels=2, depth=3, width=4)
    model.classifier = nn.Sequential(nn.Dropout(0.5), model.classifier)  # consumes global RNG
    model = fa.convert(model, rule="brsf", scale="match", seed=2)
    inputs, targets = torch.randn(6, 2, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(inputs), targets).backward()  # leaves .grad and fresh BN statistics
    model.eval()
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    fa.alignment.measure(model, inputs, targets)
    assert not model.training
    after = model.state_dict()
    for key, value in state.items():
        assert torch.equal(value, after[key]), key
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)


def test_measure_needs_a_converted_model():
    with pytest.raises(ValueError, match="needs a converted model"):
        fa.alignment.measure(mlp(), *toy_batch())
