"""Kunin et al.'s alignment rules (sa, aa, ia): B learns from the gradient of a regulariser R(B),
checked against R written out here with torch's own operations and differentiated by autograd,
and against the rules' closed-form fixed points."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import feedback_alignment as fa
from feedback_alignment.train import parameter_groups

pytestmark = pytest.mark.usefixtures("float64")

REGULARIZED = ("sa", "aa", "ia")


def reference_regularizer(rule: str, options: dict, plain: nn.Module, weight, feedback, x):
    """R(B) of `rule` with its `options` as coefficients."""
    coefficients = {primitive: options[option] for option, primitive in fa.get_rule(rule).regularizer.items()}
    return reference_primitives(coefficients, plain, weight, feedback, x)


def reference_primitives(coefficients: dict, plain: nn.Module, weight, feedback, x):
    """sum of coefficient * primitive, from the definitions: r and s by the plain layer (no bias)
    carrying W and B, u = r B by autograd's adjoint of the layer's map, N the batch size."""
    def apply(input, w):
        return torch.func.functional_call(plain, {"weight": w}, (input,))

    n = 1 if x.dim() == 1 else x.shape[0]  # a linear layer's 1-d input is one example
    r, s = apply(x, weight), apply(x, feedback)
    probe = torch.zeros_like(x, requires_grad=True)  # the map is linear: its adjoint at any point
    u, = torch.autograd.grad(apply(probe, feedback), probe, grad_outputs=r, create_graph=True)
    decay = weight.square().sum() + feedback.square().sum()
    primitives = dict(decay=decay, self=-(weight * feedback).sum(),
                      sparse=(r.square().sum() + s.square().sum()) / n,
                      amp=-(r * s).sum() / n, null=u.square().sum() / n)
    return sum(coefficient * primitives[primitive] for primitive, coefficient in coefficients.items())


LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (6, 7)),
    "linear-sequence": (lambda: nn.Linear(7, 5), (3, 4, 7)),  # N = 3 examples of 4 positions
    "linear-unbatched": (lambda: nn.Linear(7, 5), (7,)),  # N = 1
    "conv2d-stride-padding-groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (5, 4, 9, 9)),
    "conv1d-dilation-no-bias": (lambda: nn.Conv1d(3, 4, 3, dilation=2, padding=2, bias=False), (4, 3, 11)),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (3, 2, 6, 6)),
    "conv-transpose2d-stride": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1), (2, 4, 5, 5)),
}


@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("rule", REGULARIZED)
def test_one_sgd_step_moves_b_by_minus_lr_times_the_gradient_of_r(rule, layer_name):
    make, shape = LAYERS[layer_name]
    torch.manual_seed(0)
    reference = make()
    options = {"alpha": 0.3, "beta": 0.7, "gamma": 0.2}
    options = {name: value for name, value in options.items() if name in fa.get_rule(rule).regularizer}
    layer = fa.convert(copy.deepcopy(reference), rule=rule, seed=0, **options)
    x = torch.randn(shape)
    if getattr(reference, "padding_mode", "zeros") != "zeros":
        # The converted layer pads outside its Function: R reads the padded input.
        reference_input = F.pad(x, reference._reversed_padding_repeated_twice, mode=reference.padding_mode)
        plain = copy.deepcopy(reference)
        plain.padding_mode, plain.padding = "zeros", (0,) * len(reference.kernel_size)
    else:
        reference_input, plain = x, copy.deepcopy(reference)
    plain.bias = None
    before = layer.feedback_direction.detach().clone()
    feedback = before.clone().requires_grad_()
    expected, = torch.autograd.grad(
        reference_regularizer(rule, options, plain, reference.weight.detach(), feedback, reference_input), feedback)

    lr = 0.5
    optimizer = torch.optim.SGD([layer.feedback_direction], lr=lr)
    output = layer(x.clone().requires_grad_())
    (output * torch.randn_like(output)).sum().backward()
    task_gradient = layer.feedback_direction.grad.clone()
    optimizer.step()
    torch.testing.assert_close(layer.feedback_direction.detach(), before - lr * expected, rtol=1e-10, atol=1e-12)

    # The task loss gives B nothing: another loss leaves B's gradient as it was, to the bit.
    layer.feedback_direction.grad = None
    with torch.no_grad():
        layer.feedback_direction.copy_(before)
    layer(x).sum().mul(0.0).backward()
    assert torch.equal(layer.feedback_direction.grad, task_gradient)


@pytest.mark.parametrize("coefficients", [
    dict(decay=0.3, self=0.7, sparse=0.2, amp=0.5, null=0.11),  # every term at once
    dict(sparse=0.2, null=0.11), dict(amp=0.5), dict(null=0.11), dict(sparse=0.2),
], ids=lambda c: "+".join(c))
@pytest.mark.parametrize("layer_name", ["linear-sequence", "conv2d-stride-padding-groups"])
def test_any_weighting_of_the_primitives_has_the_gradient_of_its_r(coefficients, layer_name):
    """regularizers.feedback_gradient for weightings no registered rule uses (yet): a new rule
    names its primitives and gets the right gradient."""
    from feedback_alignment.functions import ConvArgs
    from feedback_alignment.regularizers import Terms, feedback_gradient

    make, shape = LAYERS[layer_name]
    torch.manual_seed(0)
    plain = make()
    plain.bias = None
    weight, x = plain.weight.detach(), torch.randn(shape)
    feedback = torch.randn_like(weight).requires_grad_()
    expected, = torch.autograd.grad(reference_primitives(coefficients, plain, weight, feedback, x), feedback)
    conv = None
    if isinstance(plain, nn.Conv2d):
        conv = ConvArgs(list(plain.stride), list(plain.padding), list(plain.dilation), False, [0, 0], plain.groups)
    r = torch.func.functional_call(plain, {"weight": weight}, (x,))
    got = feedback_gradient(Terms(**coefficients), feedback.detach(), weight, x, r, conv)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", REGULARIZED)
def test_the_input_and_weight_gradients_stay_those_of_fa(rule):
    """Learning B changes nothing else: the error still goes back through B, W's gradient is
    W's own."""
    torch.manual_seed(0)
    reference = nn.Conv2d(3, 4, 3, padding=1)
    layer = fa.convert(copy.deepcopy(reference), rule=rule, seed=0)
    x = torch.randn(2, 3, 6, 6)
    x_layer, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_output = torch.randn(2, 4, 6, 6)
    layer(x_layer).backward(grad_output)
    reference(x_reference).backward(grad_output)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)
    expected = torch.nn.grad.conv2d_input(x.shape, layer.feedback_direction.detach(), grad_output, padding=1)
    torch.testing.assert_close(x_layer.grad, expected, rtol=1e-12, atol=1e-12)


def _steps(layer, x, lr, steps):
    """Plain SGD on B alone, on one fixed batch (W does not move)."""
    layer.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([layer.feedback_direction], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        layer(x).sum().backward()
        optimizer.step()
    return layer.feedback_direction.detach()


def test_sa_pulls_b_to_w_geometrically():
    """dR/dB = 2 alpha B - beta W: with beta = 2 alpha, B - W shrinks by (1 - 2 alpha lr) a step."""
    torch.manual_seed(0)
    layer = fa.convert(nn.Linear(6, 4), rule="sa", seed=0, alpha=0.1, beta=0.2)
    weight = layer.weight.detach().clone()
    gap = layer.feedback_direction.detach() - weight
    x = torch.randn(5, 6)
    torch.testing.assert_close(_steps(layer, x, 1.0, 1) - weight, 0.8 * gap, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_steps(layer, x, 1.0, 99) - weight, 0.8 ** 100 * gap, rtol=1e-9, atol=1e-12)


def test_strength_multiplies_every_coefficient():
    """sa with strength 10 steps B exactly as sa with alpha and beta 10 times larger."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    strong = fa.convert(copy.deepcopy(base), rule="sa", seed=0, alpha=0.01, beta=0.02, strength=10.0)
    large = fa.convert(copy.deepcopy(base), rule="sa", seed=0, alpha=0.1, beta=0.2)
    torch.testing.assert_close(_steps(strong, x, 1.0, 3), _steps(large, x, 1.0, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["aa", "ia"])
def test_examples_limits_the_data_terms_to_the_batchs_first_examples(rule):
    torch.manual_seed(0)
    reference = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = fa.convert(copy.deepcopy(reference), rule=rule, seed=0, examples=2)
    x = torch.randn(5, 3, 6, 6)
    feedback = layer.feedback_direction.detach().clone().requires_grad_()
    options = layer.rule_options
    expected, = torch.autograd.grad(
        reference_regularizer(rule, options, reference, reference.weight.detach(), feedback, x[:2]), feedback)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.feedback_direction.grad, expected, rtol=1e-10, atol=1e-12)


def test_aa_makes_b_act_like_w_on_the_datas_subspace_and_leaves_the_rest():
    """dR/dB = (1/N)(2 alpha B - beta W) X^T X: with beta = 2 alpha, B converges to W on the span
    of the data and keeps its own values on the orthogonal complement."""
    torch.manual_seed(0)
    layer = fa.convert(nn.Linear(8, 4), rule="aa", seed=0, alpha=1.0, beta=2.0)
    basis = torch.linalg.qr(torch.randn(8, 3))[0]  # the data live in 3 of the 8 input dimensions
    x = torch.randn(32, 3) @ basis.t()
    on_data = basis @ basis.t()
    off_data = torch.eye(8) - on_data
    weight, start = layer.weight.detach().clone(), layer.feedback_direction.detach().clone()
    curvature = torch.linalg.eigvalsh(2.0 * x.t() @ x / 32).max()
    feedback = _steps(layer, x, float(1.0 / curvature), 300)
    torch.testing.assert_close(feedback @ on_data, weight @ on_data, rtol=0, atol=1e-9)
    torch.testing.assert_close(feedback @ off_data, start @ off_data, rtol=0, atol=1e-12)


def test_ia_makes_b_the_ridge_decoder_of_the_input_from_the_output():
    """dR/dB = -(alpha/N) R^T X + (2 beta/N) R^T R B + 2 gamma B = 0 at B = (R^T R + N I)^-1 R^T X
    for alpha = 2 beta = 2 gamma: the ridge regression of x on r = W x with penalty N."""
    torch.manual_seed(0)
    layer = fa.convert(nn.Linear(6, 4), rule="ia", seed=0, alpha=2.0, beta=1.0, gamma=1.0)
    x = torch.randn(32, 6)
    r = x @ layer.weight.detach().t()
    decoder = torch.linalg.solve(r.t() @ r + 32 * torch.eye(4), r.t() @ x)
    curvature = torch.linalg.eigvalsh(2.0 * r.t() @ r / 32 + 2.0 * torch.eye(4)).max()
    feedback = _steps(layer, x, float(1.0 / curvature), 400)
    torch.testing.assert_close(feedback, decoder, rtol=0, atol=1e-10)
    assert not torch.allclose(decoder, layer.weight.detach(), atol=1e-2)  # not W: a decoder


def test_a_first_layer_with_frozen_w_still_teaches_b():
    """The regulariser reads the layer's data even where neither the input nor W needs a gradient."""
    layer = fa.convert(nn.Linear(6, 4), rule="aa", seed=0)
    layer.weight.requires_grad_(False)
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.feedback_direction.grad is not None and layer.feedback_direction.grad.abs().sum() > 0


@pytest.mark.parametrize("rule, takes_weight_decay", [("ia", False), ("kp", True)])
def test_the_training_optimizer_leaves_a_regularized_b_to_its_own_decay_term(rule, takes_weight_decay):
    model = fa.convert(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), rule=rule, seed=0)
    groups = parameter_groups(model)
    optimizer = torch.optim.SGD(groups, lr=0.1, weight_decay=0.01)
    feedback = [layer.feedback_direction for _, layer in fa.feedback_layers(model)]
    assert all(isinstance(parameter, nn.Parameter) for parameter in feedback)
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decays) == len(list(model.parameters()))
    assert decays[id(model[0].weight)] == 0.01
    for parameter in feedback:
        assert decays[id(parameter)] == (0.01 if takes_weight_decay else 0.0)


@pytest.mark.parametrize("options, message", [
    ({"alpha": -1.0}, "rule 'sa' option 'alpha' must be at least 0.0, not -1.0"),
    ({"gamma": 1.0}, "rule 'sa' has no option 'gamma'; it takes alpha, alpha_start, alpha_stop, beta, "
                     "beta_start, beta_stop, strength, examples"),
    ({"beta_start": 0.5, "beta_stop": 0.5}, "rule 'sa' option beta_start \\(0.5\\) must be below beta_stop "
                                            "\\(0.5\\): beta would never count"),
    ({"alpha_stop": 1.5}, "rule 'sa' option 'alpha_stop' must be between 0.0 and 1.0, not 1.5"),
])
def test_regularizer_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        fa.convert(nn.Linear(3, 2), rule="sa", **options)


@pytest.mark.parametrize("progress, counting", [
    (0.0, ()), (0.2499, ()), (0.25, ("beta",)), (0.5, ("alpha", "beta")), (0.7499, ("alpha", "beta")),
    (0.75, ("alpha",)), (1.0, ("alpha",)),
])
def test_a_coefficient_on_a_schedule_counts_from_its_start_until_its_stop(progress, counting):
    """sa with alpha from half of training on and beta from a quarter to three quarters: B's
    gradient is 2 alpha B - beta W with each coefficient 0 outside its part of training."""
    torch.manual_seed(0)
    layer = fa.convert(nn.Linear(6, 4), rule="sa", seed=0, alpha=0.3, alpha_start=0.5,
                       beta=0.7, beta_start=0.25, beta_stop=0.75)
    fa.set_progress(layer, progress)
    weight, feedback = layer.weight.detach(), layer.feedback_direction.detach()
    alpha, beta = (0.3 if "alpha" in counting else 0.0), (0.7 if "beta" in counting else 0.0)
    layer(torch.randn(5, 6)).sum().backward()
    torch.testing.assert_close(layer.feedback_direction.grad, 2 * alpha * feedback - beta * weight,
                               rtol=1e-12, atol=1e-12)


def test_a_schedule_without_progress_is_a_one_line_error():
    layer = fa.convert(nn.Linear(6, 4), rule="ia", seed=0, gamma_stop=0.5)
    with pytest.raises(RuntimeError, match=r"^coefficient 'gamma' is on a schedule over training: tell the model "
                                           r"how far training is with fa.set_progress\(model, fraction\) before each step$"):
        layer(torch.randn(5, 6))
    with pytest.raises(ValueError, match="training progress is a fraction between 0 and 1, not 1.5"):
        fa.set_progress(layer, 1.5)


def test_the_training_cli_reports_progress_from_the_first_step_on(tmp_path):
    """sa with only its beta term, on for the first half of a 2-epoch run and plain SGD (no
    momentum): B moves in the first epoch exactly as in a 1-epoch run with beta always on and
    not at all in the second. Progress counted one step late or early moves the edge by a step."""
    from feedback_alignment import data, train

    digits = tmp_path / "digits.pt"
    data.prepare_digits(digits)

    def final_feedback(out, epochs, *options):
        train.main(["--dataset", "digits", "--data", str(digits), "--out", str(out), "--arch", "convnet",
                    "--depth", "2", "--width", "4", "--rule", "sa", "--epochs", str(epochs), "--batch-size", "64",
                    "--lr", "0.05", "--momentum", "0", "--threads", "1", "--device", "cpu", "--seed", "1",
                    "--rule-option", "alpha=0", "--rule-option", "beta=0.5", *options])
        state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
        return {key: value for key, value in state.items() if key.endswith("feedback_direction")}

    half = final_feedback(tmp_path / "half", 2, "--rule-option", "beta_stop=0.5")
    whole_first_epoch = final_feedback(tmp_path / "one", 1)
    assert half.keys() == whole_first_epoch.keys() and half
    for key in half:
        assert torch.equal(half[key], whole_first_epoch[key]), key
