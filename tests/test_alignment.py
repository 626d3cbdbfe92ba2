"""fa.alignment.measure against hand-checkable cases: bp, the output layer, fa's alignment."""
import copy
import math

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
    with pytest.raises(ValueError, match=r"^measure needs a converted model \(fa.convert\); this one has no "
                                         "feedback layers$"):
        fa.alignment.measure(mlp(), *toy_batch())


def test_angle_degrees_by_hand():
    from feedback_alignment.alignment import angle_degrees
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert angle_degrees(e1, e2) == 90.0  # unit vectors: a norm product of exactly 1
    assert angle_degrees(e1, torch.tensor([1.0, 1.0])) == pytest.approx(45.0)
    assert math.isnan(angle_degrees(torch.zeros(3), torch.ones(3)))
    # Antiparallel vectors whose cosine rounds below -1 in double precision: still 180, not a
    # math domain error.
    x = torch.tensor([0.1, 0.1, 0.3], dtype=torch.float64)
    cosine = float(x @ (-3 * x) / (x.norm() * (-3 * x).norm()))
    assert cosine < -1.0
    assert angle_degrees(x, -3 * x) == 180.0


class ResidualNet(nn.Module):
    """conv - relu - conv, plus the input (a skip), relu, global mean, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h2 = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        return self.fc(h2.mean((2, 3)))


def _hand_signals(model, x, labels, through):
    """The error each layer sends into its input and its weight gradient, written out: the
    output error back through `through(layer)` (B under fa, W under backprop) at each layer,
    ReLU masks, the mean's 1/(H W); a layer's own signal only (not the skip's share)."""
    conv1, conv2, fc = model.conv1, model.conv2, model.fc
    z1 = F.conv2d(x, conv1.weight, conv1.bias, padding=1)
    h1 = F.relu(z1)
    z2 = F.conv2d(h1, conv2.weight, conv2.bias, padding=1) + x
    h2 = F.relu(z2)
    pooled = h2.mean((2, 3))
    logits = F.linear(pooled, fc.weight, fc.bias)
    g_logits = (logits.softmax(1) - F.one_hot(labels, 4)) / x.shape[0]
    g_pooled = g_logits @ through(fc)
    g_z2 = (g_pooled[:, :, None, None] / (x.shape[2] * x.shape[3])).expand_as(z2) * (z2 > 0)
    g_h1 = torch.nn.grad.conv2d_input(h1.shape, through(conv2), g_z2, padding=1)
    g_z1 = g_h1 * (z1 > 0)
    g_x = torch.nn.grad.conv2d_input(x.shape, through(conv1), g_z1, padding=1)
    return {"conv1": (torch.nn.grad.conv2d_weight(x, conv1.weight.shape, g_z1, padding=1), g_x),
            "conv2": (torch.nn.grad.conv2d_weight(h1, conv2.weight.shape, g_z2, padding=1), g_h1),
            "fc": (g_logits.t() @ pooled, g_pooled)}


@pytest.mark.usefixtures("float64")
def test_fas_signal_and_update_angles_are_those_of_the_hand_computed_signals_through_a_residual_block():
    """measure's angle_signal, angle_update and gradient norms under fa against the signals
    written out by hand: the error at each layer's input through B (and backprop's through W),
    where the block's input feeds both conv1 and the skip."""
    torch.manual_seed(0)
    model = fa.convert(ResidualNet(), rule="fa", seed=3)
    x, labels = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 3, 0])
    frame = fa.alignment.measure(model, x, labels).set_index("layer")
    with torch.no_grad():
        rule = _hand_signals(model, x, labels, lambda layer: layer.feedback_weight)
        exact = _hand_signals(model, x, labels, lambda layer: layer.weight)
    for name in ("conv1", "conv2", "fc"):
        (grad, signal), (grad_bp, signal_bp) = rule[name], exact[name]
        row = frame.loc[name]
        assert row.angle_signal == pytest.approx(fa.alignment.angle_degrees(signal, signal_bp), abs=1e-9), name
        assert row.angle_update == pytest.approx(fa.alignment.angle_degrees(grad, grad_bp), abs=1e-9), name
        assert row.grad_norm == pytest.approx(float(grad.norm()), rel=1e-9), name
        assert row.grad_norm_bp == pytest.approx(float(grad_bp.norm()), rel=1e-9), name
    # fa's B is not W: the signals below the classifier point elsewhere, and the classifier's
    # own update is backprop's (its output error is exact).
    assert frame.loc["conv1"].angle_signal > 10 and frame.loc["conv2"].angle_signal > 10
    assert frame.loc["fc"].angle_update == pytest.approx(0, abs=1e-6)


class _RecordsMode(nn.Module):
    """Registers its layers in the reverse of the order its forward uses them, and records the
    mode (train or eval) of each forward."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(6, 3)
        self.early = nn.Linear(4, 6)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.late(self.early(x).relu())


@pytest.mark.parametrize("train_mode", [None, True, False], ids=["default", "train", "eval"])
def test_measure_rows_follow_the_forward_and_name_the_rule_in_the_mode_asked_for(train_mode):
    torch.manual_seed(0)
    model = fa.convert(_RecordsMode(), rule="usf", scale="match", seed=0).eval()
    inputs, targets = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    frame = (fa.alignment.measure(model, inputs, targets) if train_mode is None
             else fa.alignment.measure(model, inputs, targets, train_mode=train_mode))
    assert list(frame.layer) == ["early", "late"]  # forward order, not registration order
    assert list(frame.rule) == ["usf", "usf"]
    assert model.modes == [train_mode is not False] * 2  # both passes; the default is train mode
    assert not model.training  # and the model's own mode comes back


def test_after_measure_brsf_draws_a_fresh_b_every_step_again():
    """measure freezes B for its two passes; training afterwards redraws it as before."""
    torch.manual_seed(0)
    model = fa.convert(mlp(), rule="brsf", scale="match", seed=0)
    inputs, targets = toy_batch(8)
    fa.alignment.measure(model, inputs, targets)
    layer = model[2]
    draws, feedback = int(layer.feedback_draws), layer.feedback_weight.clone()
    F.cross_entropy(model(inputs), targets).backward()
    assert int(layer.feedback_draws) == draws + 1
    assert not torch.equal(layer.feedback_weight, feedback)


def test_measure_reports_the_b_the_model_holds_not_a_fresh_draw():
    """brsf draws B anew before each training forward; measure's passes must use (and report) the B
    the model holds, not draw one of their own."""
    from feedback_alignment.alignment import angle_degrees

    torch.manual_seed(0)
    model = fa.convert(mlp(), rule="brsf", scale="match", seed=0)
    inputs, targets = toy_batch(8)
    F.cross_entropy(model(inputs), targets).backward()  # B as the last step drew it
    held = {name: angle_degrees(layer.feedback_weight.flatten(), layer.weight.flatten())
            for name, layer in fa.feedback_layers(model)}
    # The same B as fixed feedback (fa, no scaling): the angles measure must find.
    fixed = fa.convert(mlp(), rule="fa", scale="none", seed=0)
    with torch.no_grad():
        for (_, layer), (_, twin) in zip(fa.feedback_layers(model), fa.feedback_layers(fixed)):
            twin.weight.copy_(layer.weight), twin.feedback_direction.copy_(layer.feedback_weight)
            twin.feedback_gain.fill_(1.0)
    rows = fa.alignment.measure(model, inputs, targets).set_index("layer")
    expected = fa.alignment.measure(fixed, inputs, targets).set_index("layer")
    for name, angle in held.items():
        assert rows.loc[name, "angle_feedback_weight"] == pytest.approx(angle, abs=1e-4), name
        for column in ("angle_feedback_weight", "angle_update", "angle_signal", "grad_norm", "grad_norm_bp"):
            assert rows.loc[name, column] == pytest.approx(expected.loc[name, column], rel=1e-5, nan_ok=True), (
                name, column)
