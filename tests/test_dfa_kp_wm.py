"""Direct feedback alignment, Kolen-Pollack and weight mirrors, against hand-computed references."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import feedback_alignment as fa
from feedback_alignment.alignment import angle_degrees, measure
from feedback_alignment.models import build_model

pytestmark = pytest.mark.usefixtures("float64")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


# -- dfa ----------------------------------------------------------------------------------

def test_dfa_weight_gradients_are_the_projected_output_error_gated_by_the_nonlinearity():
    plain = mlp()
    model = fa.convert(copy.deepcopy(plain), rule="dfa", seed=1)
    x, y = torch.randn(7, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    # The reference, by hand, from the plain model's activations and output error.
    a1 = plain[0](x)
    h1 = a1.relu()
    a2 = plain[2](h1)
    h2 = a2.relu()
    logits = plain[4](h2)
    e = torch.autograd.grad(F.cross_entropy(logits, y), logits)[0]
    b3, b2 = model[4].feedback_weight, model[2].feedback_weight  # 3 x 4 and 3 x 5
    assert b3.shape == (3, 4) and b2.shape == (3, 5)
    delta2 = (e @ b3) * (a2 > 0)
    delta1 = (e @ b2) * (a1 > 0)
    torch.testing.assert_close(model[4].weight.grad, e.t() @ h2.detach())  # the classifier is exact
    torch.testing.assert_close(model[2].weight.grad, delta2.t() @ h1.detach())
    torch.testing.assert_close(model[2].bias.grad, delta2.sum(0))
    torch.testing.assert_close(model[0].weight.grad, delta1.t() @ x)
    assert model[0].feedback_direction.numel() == 0  # the input needs no gradient: no B drawn


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("conv", [None, "conv2d", "conv-transpose2d"],
                         ids=["linear-over-a-sequence", "conv2d", "conv-transpose2d"])
def test_dfas_backward_gives_the_true_weight_and_bias_gradients_and_sends_e_at_b(conv, bias):
    """DirectFeedbackFunction alone, for an input of rank 3 or 4 (a linear layer applied to every
    position of a sequence; a padded, strided conv and transposed conv): weight and bias gradients
    are torch's own for the arriving grad_output, and the input gradient is the output error times
    B, shaped like the input; a layer without bias gets none."""
    from feedback_alignment.direct import DirectFeedbackFunction, OutputError
    from feedback_alignment.functions import ConvArgs

    torch.manual_seed(0)
    if conv == "conv2d":
        x, weight = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3)
        args = ConvArgs((2, 1), (1, 0), (1, 1), False, (0, 0), 1)
        reference = lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=(1, 0))
    elif conv == "conv-transpose2d":
        x, weight = torch.randn(2, 3, 6, 5), torch.randn(3, 4, 3, 3)  # in x out x kernel
        args = ConvArgs((2, 1), (1, 0), (1, 1), True, (1, 0), 1)
        reference = lambda x, w, b: F.conv_transpose2d(x, w, b, stride=(2, 1), padding=(1, 0), output_padding=(1, 0))
    else:
        x, weight, args = torch.randn(2, 7, 5), torch.randn(4, 5), None
        reference = F.linear
    b = torch.randn(4) if bias else None
    error = OutputError()
    error.store(torch.randn(2, 3))  # the model's output error: 2 images, 3 classes
    feedback = torch.randn(3, x[0].numel())
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    out = DirectFeedbackFunction.apply(leaves[0], leaves[1], leaves[2] if bias else None, feedback, error, "l",
                                       args, None)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    plain = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    expected_out = reference(plain[0], plain[1], plain[2] if bias else None)
    torch.testing.assert_close(out, expected_out)
    expected_out.backward(grad_output)
    torch.testing.assert_close(leaves[1].grad, plain[1].grad)
    if bias:
        torch.testing.assert_close(leaves[2].grad, plain[2].grad)
    torch.testing.assert_close(leaves[0].grad, (error.value @ feedback).view(x.shape))
    assert not torch.allclose(leaves[0].grad, plain[0].grad)
    # A backward that did not start at the model's output leaves the error empty: named, not guessed.
    out = DirectFeedbackFunction.apply(x.clone().requires_grad_(), weight, b, feedback, OutputError(), "block.conv",
                                       args, None)
    with pytest.raises(RuntimeError, match="dfa layer 'block.conv' has no output error to project: the loss "
                                           r"must be computed from the model's output \(the class scores\)"):
        out.sum().backward()


def test_dfa_conv_feedback_is_full_spatial():
    torch.manual_seed(0)
    model = fa.convert(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)),
                       rule="dfa", seed=0)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    logits = model(x)
    logits.retain_grad()
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    b = model[0].feedback_weight
    assert b.shape == (4, 2 * 5 * 5)  # its own feedback for every channel and position
    torch.testing.assert_close(x.grad, (logits.grad @ b).view(x.shape))
    # The conv's weight gradient is the true one for the error that reached its output.
    reference = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        reference.weight.copy_(model[0].weight)
        reference.bias.copy_(model[0].bias)
    out = reference(x.detach())
    grad_out = (logits.grad @ model[2].feedback_weight).view(out.shape)
    out.backward(grad_out)
    torch.testing.assert_close(model[0].weight.grad, reference.weight.grad)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_dfa_never_computes_the_true_input_gradient():
    torch.manual_seed(0)
    model = fa.convert(build_model("convnet", 10, 1, 8, True, 3, 8), rule="dfa", seed=0)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    with _Ops() as ops:
        loss.backward()
    conv_backwards = [args for func, args in ops.calls if func is torch.ops.aten.convolution_backward.default]
    assert len(conv_backwards) == 3
    assert all(args[-1][0] is False for args in conv_backwards)  # output_mask: no input gradient
    # Neither is the classifier's W^T applied to the error: only B's (10 x 32) product appears.
    classifier_weight = model.classifier.weight
    assert not any(any(a is classifier_weight for a in args if isinstance(a, torch.Tensor))
                   for func, args in ops.calls if func is torch.ops.aten.mm.default)


def test_dfa_errors_are_clear():
    with pytest.raises(ValueError, match="rule 'dfa' needs a classifier"):
        fa.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), rule="dfa")
    with pytest.raises(ValueError, match="takes scale 'none'"):
        fa.convert(mlp(), rule="dfa", scale="match")
    model = fa.convert(nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)), rule="dfa")
    with pytest.raises(ValueError, match=r"class scores \(batch x 3\), got shape \(6,\)"):
        model(torch.randn(2, 4))


def test_dfa_state_dict_round_trips_the_lazily_drawn_feedback():
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    trained = fa.convert(mlp(), rule="dfa", seed=4)
    F.cross_entropy(trained(x), y).backward()
    fresh = fa.convert(mlp(), rule="dfa", seed=9)
    fresh.load_state_dict(trained.state_dict())
    for (name, a), (_, b) in zip(fa.feedback_layers(trained), fa.feedback_layers(fresh)):
        assert torch.equal(a.feedback_direction, b.feedback_direction), name
    same_seed = fa.convert(mlp(), rule="dfa", seed=4)
    torch.manual_seed(123)  # the global RNG plays no part
    F.cross_entropy(same_seed(x), y).backward()
    assert torch.equal(same_seed[2].feedback_weight, trained[2].feedback_weight)


def test_dfa_in_the_alignment_analysis():
    model = fa.convert(mlp(), rule="dfa", seed=0)
    frame = measure(model, torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert list(frame.layer) == ["0", "2", "4"]
    assert math.isnan(frame.angle_feedback_weight[1])  # 3 x 5 B beside a 4 x 5 W: no angle
    assert math.isnan(frame.norm_ratio[1])  # nor a norm ratio
    assert frame.angle_update[2] == pytest.approx(0, abs=1e-5)  # the classifier's update is exact
    assert 0 < frame.angle_update[1] < 180


def test_after_measure_dfa_still_refuses_an_output_that_is_not_the_logits():
    """measure's backprop pass lets the dfa model's output through unchecked; afterwards the check
    is back."""
    class Switchable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.log_probabilities = mlp(), False

        def forward(self, x):
            logits = self.net(x)
            return logits.log_softmax(1) if self.log_probabilities else logits

    model = fa.convert(Switchable(), rule="dfa", seed=0)
    measure(model, torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    model.log_probabilities = True
    with pytest.raises(ValueError, match="made by LogSoftmaxBackward0"):
        model(torch.randn(4, 6))


# -- kp -----------------------------------------------------------------------------------

def test_kp_feedback_is_a_parameter_whose_gradient_is_the_weights():
    model = fa.convert(mlp(), rule="kp", seed=0)
    reference = mlp()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(model(x), y).backward()
    parameters = {id(p) for p in model.parameters()}
    for name, layer in fa.feedback_layers(model):
        assert id(layer.feedback_direction) in parameters, name
        assert torch.equal(layer.feedback_direction.grad, layer.weight.grad), name
    # The classifier's gradient is exact; hidden layers' input gradients go through B, not W.
    F.cross_entropy(reference(x), y).backward()
    torch.testing.assert_close(model[4].weight.grad, reference[4].weight.grad)


def test_kp_difference_between_b_and_w_decays_geometrically_under_sgd():
    # Same update for B and W, each decayed by its own weight decay: B - W shrinks by
    # (1 - lr * wd) per step, whatever the gradients are.
    model = fa.convert(mlp(), rule="kp", seed=0)
    lr, wd, steps = 0.1, 0.05, 40
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    start = {name: (l.feedback_direction - l.weight).detach().clone() for name, l in fa.feedback_layers(model)}
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, layer in fa.feedback_layers(model):
        expected = start[name] * (1 - lr * wd) ** steps
        torch.testing.assert_close(layer.feedback_direction - layer.weight, expected, msg=name)


def test_kp_angle_between_b_and_w_falls_toward_zero_in_training():
    from sklearn.datasets import load_digits
    torch.set_default_dtype(torch.float32)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = fa.convert(build_model("convnet", 10, 1, 8, True, 3, 16), rule="kp", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    angles = []  # the largest angle over the layers, every 100 steps
    for step in range(601):
        if step % 100 == 0:
            angles.append(max(angle_degrees(l.feedback_weight, l.weight) for _, l in fa.feedback_layers(model)))
        batch = torch.randint(0, len(labels), (32,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    assert angles[0] > 85
    assert all(later < earlier for earlier, later in zip(angles, angles[1:])), angles
    assert angles[-1] < 10, angles


# -- wm -----------------------------------------------------------------------------------

def mirror_model():
    torch.manual_seed(0)
    return fa.convert(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), nn.ReLU(),
                                    nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3), nn.ReLU(),
                                    nn.Flatten(), nn.Linear(6 * 4 * 4, 5)), rule="wm", seed=0)


def test_weight_mirrors_bring_b_to_w():
    model = mirror_model()
    before = [angle_degrees(l.feedback_weight, l.weight) for _, l in fa.feedback_layers(model)]
    for _ in range(60):
        fa.mirror.mirror_step(model)
    after = [angle_degrees(l.feedback_weight, l.weight) for _, l in fa.feedback_layers(model)]
    assert min(before) > 80 and max(after) < 5, (before, after)
    # B_60 = 0.95^60 B_0 + (1 - 0.95^60) W + noise (decay 0.05): W's share is 0.954 by now, and
    # B_0's leftover is orthogonal to W and 20x smaller, so ||B|| / ||W|| is 0.954 up to the noise.
    for _, layer in fa.feedback_layers(model):
        ratio = float(layer.feedback_weight.norm() / layer.weight.detach().norm())
        assert ratio == pytest.approx(1 - 0.95**60, abs=0.025)


def test_weight_mirror_fixed_point_is_lr_over_decay_times_w():
    model = mirror_model()
    for _ in range(150):
        fa.mirror.mirror_step(model, lr=0.2, decay=0.1, batch_size=64)
    for name, layer in fa.feedback_layers(model):
        torch.testing.assert_close(layer.feedback_weight, 2 * layer.weight.detach(), rtol=0, atol=0.15 * float(
            layer.weight.detach().abs().max()), msg=name)


def test_weight_mirrors_are_reproducible_and_leave_w_alone():
    a, b = mirror_model(), mirror_model()
    weights = [l.weight.detach().clone() for _, l in fa.feedback_layers(a)]
    torch.manual_seed(1)
    fa.mirror.mirror_step(a)
    torch.manual_seed(2)
    fa.mirror.mirror_step(b)
    for (name, la), (_, lb), w in zip(fa.feedback_layers(a), fa.feedback_layers(b), weights):
        assert torch.equal(la.feedback_direction, lb.feedback_direction), name
        assert torch.equal(la.weight, w), name


def test_mirror_noise_takes_the_cheap_16_bit_draws_at_unit_variance():
    """Noise drawn every mirror phase uses the 2^16-level draws (draws.fast_uniform_), as brsf's
    per-step magnitudes do: U(-sqrt 3, sqrt 3) on the grid low + (k + 1/2) step."""
    layer = mirror_model()[0]
    noise = fa.mirror._noise(layer, (64, 100)).double()
    low, step = -(3 ** 0.5), 2 * 3 ** 0.5 / 2**16
    k = (noise - low) / step - 0.5
    assert torch.allclose(k, k.round(), atol=0.01) and noise.abs().max() < 3 ** 0.5  # float32 rounding
    assert noise.var().item() == pytest.approx(1.0, abs=0.05)


def test_mirror_step_ignores_other_rules():
    assert fa.mirror.mirror_step(fa.convert(mlp(), rule="fa")) == 0


def test_the_budget_cuts_noise_images_of_the_costliest_layers_first():
    """By hand: Linear(4, 2) and Linear(100, 50), 400 positions each in training: 3 x 400 x 5008
    multiply-adds; budget 0.5 leaves 3,004,800 for the mirror phase. An image (64 vectors) costs
    2 x 64 x 8 = 1,024 on the small layer, which keeps its 16 (16,384), and 640,000 on the large
    one, which gets int(2,988,416 / 640,000) = 4."""
    model = fa.convert(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1), nn.Linear(100, 50)), rule="wm", seed=0)
    small, large = model[0], model[2]
    small(torch.randn(400, 4, requires_grad=True))
    large(torch.randn(8, 50, 100, requires_grad=True))  # positions are every input vector: 400
    assert (small.forward_positions, large.forward_positions) == (400, 400)
    layers = [small, large]
    assert fa.mirror.noise_images(layers, 16, 0.5) == [16, 4]
    assert fa.mirror.noise_images(layers, 16, 0.0) == [16, 16]  # no budget
    assert fa.mirror.noise_images(layers, 16, 1e-9) == [1, 1]  # at least one image each
    assert fa.mirror.noise_images(layers, 16, 100.0) == [16, 16]  # the budget is a bound, not a target
    assert fa.mirror.noise_images([small, model[1]], 16, 0.5) == [16, 16]  # a layer without a forward: no bound


@pytest.mark.parametrize("layer, shape, positions", [
    (lambda: nn.Conv2d(3, 4, 3, stride=2), (5, 3, 9, 9), 5 * 4 * 4),  # output positions
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), 6 * 6),  # unbatched
    (lambda: nn.Conv1d(2, 4, 3, dilation=2), (2, 2, 10), 2 * 6),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 5, 5), 2 * 5 * 5),  # input positions
    (lambda: nn.Linear(6, 2), (4, 7, 6), 4 * 7),  # input vectors
], ids=["conv2d", "conv2d-unbatched", "conv1d", "conv-transpose2d", "linear-sequence"])
def test_a_mirror_layer_records_the_positions_its_forward_applied_w_at(layer, shape, positions):
    layer = fa.convert(layer(), rule="wm", seed=0)
    layer(torch.randn(shape, requires_grad=True))
    assert layer.forward_positions == positions and type(layer.forward_positions) is int  # a count


def test_the_budget_bounds_the_mirror_phases_multiply_adds():
    """Counted by hand from the shapes: positions 8 x 32 x 32, 8 x 15 x 15, 8 x 7 x 7 and 8 in
    training (x 3: output, input and weight gradients); noise images x 64 output positions, twice,
    in the mirror phase; each times the weight's size."""
    torch.manual_seed(0)
    model = fa.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 64, 3, stride=2),
                                     nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2), nn.Flatten(), nn.Linear(3136, 4)),
                       rule="wm", seed=0)
    model(torch.randn(8, 3, 32, 32, requires_grad=True))
    training = 8192 * 8 * 27 + 1800 * 64 * 72 + 392 * 64 * 576 + 8 * 4 * 3136
    layers = fa.mirror.mirror_layers(model)
    for budget in (0.2, 0.5, 1.0):
        images = fa.mirror.noise_images(layers, 16, budget)
        mirror = sum(2 * n * 64 * layer.weight.numel() for n, layer in zip(images, layers))
        assert 0.75 * budget * 3 * training <= mirror <= budget * 3 * training, (budget, images)
        assert images != [16] * 4  # the bound binds here
    # One image each at least, even where that is more than the budget gives.
    assert fa.mirror.noise_images(layers, 16, 0.05) == [16, 1, 1, 1]


def test_the_default_budget_leaves_the_default_studys_mirror_phase_as_it_was():
    """convnet8 on 8x8 digits, batch 64: every layer keeps its 16 noise images, so B is bit for
    bit what an unbounded mirror phase gives after the same steps."""
    from feedback_alignment.models import build_model

    def trained_feedback(budget):
        torch.manual_seed(0)
        model = fa.convert(build_model("convnet", num_classes=10, in_channels=1, depth=8, width=32),
                           rule="wm", seed=0, budget=budget)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(1, 3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.randn(64, 1, 8, 8)), torch.randint(0, 10, (64,))).backward()
            optimizer.step()
            fa.after_step(model, step)
        return [layer.feedback_direction.clone() for layer in fa.mirror.mirror_layers(model)]

    default = fa.get_rule("wm").resolve_options({})["budget"]
    assert default > 0
    for a, b in zip(trained_feedback(default), trained_feedback(0.0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", ["kp", "wm"])
def test_learned_rules_take_no_feedback_scale(rule):
    with pytest.raises(ValueError, match=f"rule '{rule}' takes scale 'none', not 'init': its B is learned"):
        fa.convert(mlp(), rule=rule, scale="init")


def test_weight_mirrors_take_their_options_through_convert_and_run_between_steps():
    # fa.after_step(model, step) runs the rule's between-step work with the options given to
    # convert: a mirror phase every `every` steps with lr, decay and batch, exactly as calling
    # mirror_step by hand with them.
    torch.manual_seed(0)
    hooked = fa.convert(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), rule="wm", seed=0,
                        lr=0.2, decay=0.1, batch=8, every=2)
    torch.manual_seed(0)
    by_hand = fa.convert(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), rule="wm", seed=0)
    assert hooked[0].rule_options == {"lr": 0.2, "decay": 0.1, "batch": 8, "every": 2, "budget": 0.2}
    for step in range(1, 7):
        fa.after_step(hooked, step)
        if step % 2 == 0:
            fa.mirror.mirror_step(by_hand, lr=0.2, decay=0.1, batch_size=8)
        for a, b in zip(hooked.modules(), by_hand.modules()):
            if isinstance(a, fa.FeedbackLayer):
                assert torch.equal(a.feedback_direction, b.feedback_direction), step
    assert int(hooked[0].feedback_draws) == 1 + 3  # the initial draw, then steps 2, 4, 6


@pytest.mark.parametrize("rule", fa.RULES)
def test_every_rules_between_step_work_leaves_a_model_without_it_alone(rule):
    torch.manual_seed(0)
    model = fa.convert(mlp(), rule=rule, seed=0)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    fa.after_step(model, 1)
    changed = [key for key, value in model.state_dict().items() if not torch.equal(value, state[key])]
    if fa.get_rule(rule).after_step is None:
        assert changed == []
    else:
        assert changed and all("feedback" in key for key in changed), changed  # B, never W


@pytest.mark.parametrize("options, message", [
    (dict(rate=0.1), "rule 'wm' has no option 'rate'; it takes lr, decay, batch, every, budget"),
    (dict(batch=2.5), "rule 'wm' option 'batch' takes an integer, not 2.5"),
    (dict(batch="many"), "rule 'wm' option 'batch' takes an integer, not 'many'"),
    (dict(decay=1.5), "rule 'wm' option 'decay' must be between 0.0 and 1.0, not 1.5"),
    (dict(every=0), "rule 'wm' option 'every' must be at least 1, not 0"),
    (dict(budget=-0.1), "rule 'wm' option 'budget' must be at least 0.0, not -0.1"),
    (dict(lr=True), "rule 'wm' option 'lr' takes a number, not True"),
])
def test_rule_options_are_checked_by_name_type_and_range(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fa.convert(mlp(), rule="wm", **options)


def test_a_rule_without_options_says_so():
    with pytest.raises(ValueError, match="rule 'fa' has no option 'lr'; it takes no options"):
        fa.convert(mlp(), rule="fa", lr=0.1)


def test_the_budget_counts_a_convolutions_noise_samples_along_each_kernel_dimension():
    """By hand, 8 noise samples per image along each dimension of the kernel. Conv1d(2, 4, 3) on
    4 x 2 x 10: 32 positions x 24 weights x 3 = 2,304 in training; an image costs 2 x 8 x 24 = 384:
    6 images. Conv3d(1, 2, 2) on 2 x 1 x 5 x 5 x 5: 128 x 16 x 3 = 6,144; an image costs
    2 x 512 x 16 = 16,384, more than the whole budget: the one image every layer keeps."""
    conv1d = fa.convert(nn.Conv1d(2, 4, 3), rule="wm", seed=0)
    conv1d(torch.randn(4, 2, 10, requires_grad=True))
    conv3d = fa.convert(nn.Conv3d(1, 2, 2), rule="wm", seed=0)
    conv3d(torch.randn(2, 1, 5, 5, 5, requires_grad=True))
    assert fa.mirror.MIRROR_POSITIONS == 8
    assert fa.mirror.noise_images([conv1d], 16, 1.0) == [6] and fa.mirror.noise_images([conv3d], 16, 1.0) == [1]


def test_wms_between_step_work_is_a_mirror_phase_with_the_rules_options():
    options = dict(lr=0.3, decay=0.1, batch=8, every=1, budget=0.01)
    model = fa.convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
                       rule="wm", seed=0, **options)
    F.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([0, 2])).backward()
    by_hand, unbounded = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    fa.after_step(model, 0)
    torch.manual_seed(1)
    fa.mirror.mirror_step(by_hand, 0.3, 0.1, 8, 0.01)
    torch.manual_seed(1)
    fa.mirror.mirror_step(unbounded, 0.3, 0.1, 8, 0.0)
    for (name, layer), (_, expected), (_, other) in zip(*(fa.feedback_layers(m) for m in (model, by_hand, unbounded))):
        assert torch.equal(layer.feedback_direction, expected.feedback_direction), name
    # The budget binds here (a small batch of 2 images): without it B would differ.
    assert any(not torch.equal(layer.feedback_direction, other.feedback_direction)
               for (_, layer), (_, other) in zip(fa.feedback_layers(model), fa.feedback_layers(unbounded)))


def test_a_kp_layer_whose_w_is_frozen_teaches_its_b_nothing():
    # Kolen-Pollack moves B as W moves; a W that takes no gradient (fine-tuning the top only) and
    # an input that needs none: the layer runs plain, and its B gets no gradient either.
    model = fa.convert(mlp(), rule="kp", seed=0)
    first = fa.feedback_layers(model)[0][1]
    first.weight.requires_grad_(False), first.bias.requires_grad_(False)
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    assert first.feedback_direction.grad is None
    assert all(layer.feedback_direction.grad is not None for _, layer in fa.feedback_layers(model)[1:])


def test_a_kp_b_frozen_on_purpose_draws_no_unstepped_warning():
    import warnings

    model = fa.convert(mlp(), rule="kp", seed=0)
    for _, layer in fa.feedback_layers(model):
        layer.feedback_direction.requires_grad_(False)  # a fixed B, chosen: fa by another name
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
            optimizer.step()


def test_a_dfa_layer_outside_a_converted_model_says_so():
    from feedback_alignment.layers import from_module

    layer = from_module(nn.Linear(3, 2), "head", "dfa", "none", 0, False)  # made alone, not by fa.convert
    with pytest.raises(RuntimeError) as error:
        layer(torch.randn(2, 3, requires_grad=True))
    assert str(error.value) == "dfa layer 'head' is not part of a model converted with fa.convert(model, rule='dfa')"


def test_a_dfa_layer_without_an_output_error_names_itself():
    model = fa.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), rule="dfa", seed=0)
    hidden = model[0](torch.randn(2, 3, requires_grad=True))  # a loss on a hidden layer: no output error
    with pytest.raises(RuntimeError) as error:
        hidden.sum().backward()
    assert str(error.value).startswith("dfa layer '0' has no output error to project")


def test_frsfs_magnitudes_are_drawn_once_at_full_precision_brsfs_on_the_16_bit_grid():
    def off_grid(magnitudes, bound):  # entries not (k + 1/2) bound / 2^16 for an integer k
        levels = magnitudes.double() / bound * 2**16 - 0.5
        return (levels - levels.round()).abs().gt(1e-6).float().mean().item()
    frsf = fa.convert(nn.Linear(30, 20), rule="frsf", scale="none", seed=0)
    assert off_grid(frsf.feedback_magnitude, frsf.init_bound) > 0.9
    brsf = fa.convert(nn.Linear(30, 20), rule="brsf", scale="none", seed=0)
    brsf(torch.randn(2, 30, requires_grad=True))  # drawn before each training forward: sign(W) x magnitude
    assert off_grid(brsf.feedback_direction.abs(), brsf.init_bound) == 0.0
