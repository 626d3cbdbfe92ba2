"""What each rule promises about B, the scale techniques, seeds, buffers and conversion."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import feedback_alignment as fa
from conftest import SCALABLE_RULES
from feedback_alignment.models import build_model

SIGN_RULES = ("usf", "brsf", "frsf")


def small_net(batch_norm=True):
    torch.manual_seed(0)
    return build_model("convnet", num_classes=4, in_channels=2, depth=3, width=6, batch_norm=batch_norm)


def batch(seed=0, n=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def train_steps(model, steps, lr=0.1, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        images, labels = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return optimizer


def test_bp_equals_unconverted_model_bit_for_bit():
    plain = small_net()
    converted = fa.convert(copy.deepcopy(plain), rule="bp")
    train_steps(plain, 3)
    train_steps(converted, 3)
    for (name, a), b in zip(plain.named_parameters(), converted.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("rule", SIGN_RULES)
@pytest.mark.parametrize("scale", fa.SCALES)
def test_sign_concordant_rules_agree_in_sign_everywhere(rule, scale):
    model = fa.convert(small_net(), rule=rule, scale=scale)
    with torch.no_grad():  # exact zeros must give exact zeros in B
        model.features[0].weight[0, 0, 0, 0] = 0.0
    model.train()
    for step in range(4):
        train_steps(model, 1, lr=0.5)
        model(batch(step)[0])  # the forward that refreshes B from the updated W
        for name, layer in fa.feedback_layers(model):
            assert torch.equal(torch.sign(layer.feedback_weight), torch.sign(layer.weight)), name


def test_the_model_refreshes_every_layer_once_per_training_forward_before_it_runs():
    model = fa.convert(small_net(), rule="brsf", scale="match")
    layers = [layer for _, layer in fa.feedback_layers(model)]
    draws_before = [int(layer.feedback_draws) for layer in layers]
    seen = []  # B's signs once the model's forward starts: already those of the current W
    # (A pre-hook on a layer would make that layer refresh in its own forward, after the hook.)
    hooks = [model.register_forward_pre_hook(lambda model, args: seen.extend(
        torch.equal(layer.feedback_direction.sign(), layer.weight.sign()) for layer in layers))]
    with torch.no_grad():
        for layer in layers:
            layer.weight.neg_()  # as an optimizer step would: B must follow before the forward
    model(batch()[0])
    assert seen == [True] * len(layers)
    assert [int(layer.feedback_draws) for layer in layers] == [n + 1 for n in draws_before]  # one draw each
    for hook in hooks:
        hook.remove()
    # A layer refreshed ahead of a forward that did not reach it, then changed in place, then
    # called on its own refreshes itself again rather than trusting the earlier refresh.
    conv = model.features[0]
    from feedback_alignment.layers import refresh_ahead_of_forward
    refresh_ahead_of_forward(model, ())
    with torch.no_grad():
        conv.weight.neg_()
    conv(batch()[0])
    assert torch.equal(conv.feedback_direction.sign(), conv.weight.sign())
    # A copy of the model refreshes its own layers, not the original's.
    copied = copy.deepcopy(model)
    draws_before = [int(layer.feedback_draws) for layer in layers]
    copied(batch()[0])
    assert [int(layer.feedback_draws) for layer in layers] == draws_before
    assert all(int(a.feedback_draws) == int(b.feedback_draws) + 1
               for (_, a), b in zip(fa.feedback_layers(copied), layers))


def test_brsf_magnitudes_change_every_step_and_frsf_never():
    magnitudes = {rule: [] for rule in ("brsf", "frsf")}
    models = {rule: fa.convert(small_net(), rule=rule, scale="none") for rule in magnitudes}
    for rule, model in models.items():
        optimizer = None
        for step in range(4):
            optimizer = train_steps(model, 1, optimizer=optimizer)
            magnitudes[rule].append(model.features[3].feedback_weight.abs().clone())
    for before, after in zip(magnitudes["brsf"], magnitudes["brsf"][1:]):
        assert (before != after).float().mean() > 0.99
    for before, after in zip(magnitudes["frsf"], magnitudes["frsf"][1:]):
        assert torch.equal(before, after)
    bound = 1 / (6 * 9) ** 0.5  # default init bound of a 6-channel 3x3 conv
    assert magnitudes["brsf"][0].max() <= bound and magnitudes["frsf"][0].max() <= bound


@pytest.mark.parametrize("rule", SCALABLE_RULES)
def test_match_scale_holds_at_every_training_forward(rule):
    model = fa.convert(small_net(), rule=rule, scale="match")
    optimizer = None
    for step in range(3):
        optimizer = train_steps(model, 1, lr=0.3, optimizer=optimizer)
        model(batch(step)[0])
        for name, layer in fa.feedback_layers(model):
            w, b = layer.weight.norm().item(), layer.feedback_weight.norm().item()
            assert abs(b - w) <= 1e-6 * w, name


@pytest.mark.parametrize("rule", ["fa", "usf", "brsf", "frsf"])
def test_init_scale_fixed_at_conversion(rule):
    model = small_net()
    initial_norms = {name: m.weight.norm().item() for name, m in model.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear))}
    model = fa.convert(model, rule=rule, scale="init")
    for name, layer in fa.feedback_layers(model):
        assert layer.feedback_weight.norm().item() == pytest.approx(initial_norms[name], rel=1e-6)
    gains = [layer.feedback_gain.clone() for _, layer in fa.feedback_layers(model)]
    train_steps(model, 3, lr=0.5)
    for gain, (name, layer) in zip(gains, fa.feedback_layers(model)):
        assert torch.equal(gain, layer.feedback_gain), name


def test_none_scale_is_raw():
    model = fa.convert(small_net(), rule="usf", scale="none")
    model(batch()[0])
    assert set(model.features[3].feedback_weight.unique().tolist()) <= {-1.0, 0.0, 1.0}
    fa_model = fa.convert(small_net(), rule="fa", scale="none")
    layer = fa_model.features[3]
    assert layer.feedback_weight.abs().max() <= 1 / (6 * 9) ** 0.5
    assert layer.feedback_weight.std().item() == pytest.approx((1 / (6 * 9)) ** 0.5 / 3 ** 0.5, rel=0.2)


@pytest.mark.parametrize("rule", ["fa", "brsf", "frsf"])
def test_seed_reproduces_whatever_the_global_rng(rule):
    nets = [small_net() for _ in range(3)]  # the same weights (small_net seeds itself)
    torch.manual_seed(123)  # and then a different global RNG state at each conversion
    a = fa.convert(nets[0], rule=rule, seed=7)
    torch.manual_seed(999)
    b = fa.convert(nets[1], rule=rule, seed=7)
    c = fa.convert(nets[2], rule=rule, seed=8)
    for step in range(2):
        for model in (a, b, c):
            torch.manual_seed(step * 1000 + id(model) % 1000)  # global RNG differs per model
            model(batch(step)[0])
        for (name, la), (_, lb), (_, lc) in zip(*(fa.feedback_layers(m) for m in (a, b, c))):
            assert torch.equal(la.feedback_weight, lb.feedback_weight), name
            assert not torch.equal(la.feedback_weight, lc.feedback_weight), name
    # Two layers of the same shape in one model draw different values.
    assert not torch.equal(a.features[3].feedback_weight, a.features[6].feedback_weight)


def test_buffers_not_parameters_and_state_dict_round_trip():
    model = fa.convert(small_net(), rule="brsf", scale="match", seed=3)
    parameters_before = {id(p) for p in small_net().parameters()}
    assert len(list(model.parameters())) == len(parameters_before)
    train_steps(model, 2)
    state = copy.deepcopy(model.state_dict())
    assert {"features.0.feedback_direction", "features.0.feedback_gain", "features.0.feedback_draws"} <= set(state)
    restored = fa.convert(small_net(), rule="brsf", scale="match", seed=3)
    restored.load_state_dict(state)
    for (name, a), (_, b) in zip(fa.feedback_layers(model), fa.feedback_layers(restored)):
        assert torch.equal(a.feedback_weight, b.feedback_weight), name
    # The draw counter travels too: the next step draws the same R_t in both.
    images = batch(5)[0]
    model(images)
    restored(images)
    for (name, a), (_, b) in zip(fa.feedback_layers(model), fa.feedback_layers(restored)):
        assert torch.equal(a.feedback_weight, b.feedback_weight), name
    moved = copy.deepcopy(model).to(torch.float64)
    assert moved.features[0].feedback_weight.dtype == torch.float64


def test_optimizer_built_before_conversion_trains_the_converted_model():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first_weight = model.features[0].weight
    model = fa.convert(model, rule="frsf", scale="match")
    assert model.features[0].weight is first_weight
    before = first_weight.detach().clone()
    train_steps(model, 1, optimizer=optimizer)
    assert not torch.equal(before, model.features[0].weight)


def test_weight_norm_constraint_keeps_norm_and_still_trains():
    model = small_net()
    norms = {name: m.weight.norm().item() for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    model = fa.convert(model, rule="usf", scale="match", constrain_weight_norm=True)
    start = {name: layer.weight.detach().clone() for name, layer in fa.feedback_layers(model)}
    train_steps(model, 3, lr=0.5)
    model(batch()[0])  # the training forward applies the constraint to the last update
    for name, layer in fa.feedback_layers(model):
        assert layer.weight.norm().item() == pytest.approx(norms[name], rel=1e-6), name
        assert (layer.weight - start[name]).abs().max() > 1e-3, f"{name} did not train"


def test_eval_mode_is_the_plain_layer_and_draws_nothing():
    model = fa.convert(small_net(), rule="brsf", scale="match").eval()
    plain = small_net().eval()
    draws = model.features[0].feedback_draws.item()
    feedback = model.features[0].feedback_weight.clone()
    images = batch()[0]
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))
    assert model.features[0].feedback_draws.item() == draws
    assert torch.equal(model.features[0].feedback_weight, feedback)


def test_exclude_keeps_named_modules_exact():
    model = fa.convert(small_net(), rule="fa", exclude=("classifier",))
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.features[0], fa.FeedbackConv2d)
    model = fa.convert(small_net(), rule="fa", exclude=("features",))
    assert [name for name, _ in fa.feedback_layers(model)] == ["classifier"]


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        fa.convert(small_net(), rule="nope")
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        fa.convert(small_net(), rule="fa", scale="huge")
    with pytest.raises(ValueError, match="nothing to convert: Sequential"):
        fa.convert(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), rule="fa")
    with pytest.raises(ValueError, match="already converted"):
        fa.convert(fa.convert(small_net(), rule="fa"), rule="usf")
    with pytest.raises(ValueError, match="exclude names 'classifer'"):
        fa.convert(small_net(), rule="fa", exclude=("classifer",))


def test_shared_module_stays_shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model = fa.convert(model, rule="fa")
    assert model[0] is model[2] and isinstance(model[0], fa.FeedbackLinear)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn", "mobilenet_v2"])
def test_torchvision_models_convert_and_train_a_step(arch):
    """Every conv and linear layer converted; the classifier, whose output error is exact, gets
    the plain model's weight gradient and sends back (output error) @ B; a step trains."""
    torch.manual_seed(0)
    plain = torchvision.models.get_model(arch, weights=None, num_classes=5)
    if arch == "vgg11_bn":  # its classifier's layers at width 64, not 4096: the same layers in the same
        # order, without the 120 million weights that took most of the test's time
        plain.classifier[0], plain.classifier[3] = nn.Linear(512 * 7 * 7, 64), nn.Linear(64, 64)
        plain.classifier[6] = nn.Linear(64, 5)
    model = fa.convert(copy.deepcopy(plain), rule="frsf", scale="match", seed=0)
    counts = {nn.Conv2d: 0, nn.Linear: 0}
    for module in model.modules():
        assert type(module) not in counts, f"{type(module).__name__} left unconverted"
    classifier, plain_classifier = ([m for m in net.modules() if isinstance(m, nn.Linear)][-1] for net in (model, plain))
    seen = {}

    def keep_input_gradient(module, args):
        args[0].register_hook(lambda grad: seen.__setitem__("input_grad", grad))

    classifier.register_forward_pre_hook(keep_input_gradient)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    torch.manual_seed(1)  # the same dropout masks in both models
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    torch.manual_seed(1)
    F.cross_entropy(plain(images), labels).backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(classifier.weight.grad, plain_classifier.weight.grad, rtol=1e-5, atol=1e-7)
    output_error = (logits.detach().softmax(1) - F.one_hot(labels, 5)) / 2
    torch.testing.assert_close(seen["input_grad"], output_error @ classifier.feedback_weight, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(seen["input_grad"], output_error @ classifier.weight.detach(), rtol=1e-2, atol=0)
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batch_manhattan_by_hand():
    param = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = fa.optim.BatchManhattan([param], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(2):
        param.grad = torch.tensor([0.3, -0.1, 0.0])
        optimizer.step()
    # step 1: u = sign(g) + wd p = [1.01, -1.02, 0.005]; p = [0.899, -1.898, 0.4995]
    # step 2: u = [1.00899, -1.01898, 0.004995]; v = 0.9 [1.01, -1.02, 0.005] + u
    #         = [1.91799, -1.93698, 0.009495]; p -= 0.1 v
    torch.testing.assert_close(param.detach(), torch.tensor([0.707201, -1.704302, 0.4985505]))
    with pytest.raises(ValueError, match="lr must be > 0"):
        fa.optim.BatchManhattan([param], lr=-1)


def test_options_from_a_command_line_are_key_value_pairs():
    rule = fa.get_rule("wm")
    assert rule.parse_options(["decay=0.5"])["decay"] == 0.5
    for pair in ("decay", "=0.5"):
        with pytest.raises(ValueError) as error:
            rule.parse_options([pair])
        assert str(error.value) == f"{pair!r}: write KEY=VALUE"  # no flag named: the pair alone
    with pytest.raises(ValueError) as error:
        rule.parse_options(["decay"], flag="--rule-option ")
    assert str(error.value) == "--rule-option 'decay': write KEY=VALUE"
    with pytest.raises(ValueError) as error:  # split at the first '='
        rule.parse_options(["decay==0.5"])
    assert str(error.value) == "rule 'wm' option 'decay' takes a number, not '=0.5'"


def test_scale_errors_say_why_and_the_init_bound_of_tiny_layers():
    from feedback_alignment.rules import check_scale, default_init_bound

    with pytest.raises(ValueError) as error:
        check_scale("big")
    assert str(error.value) == f"unknown scale 'big'; choose one of {', '.join(fa.SCALES)}"
    assert ", " in str(error.value) and len(fa.SCALES) > 1
    with pytest.raises(ValueError) as error:
        check_scale("match", fa.get_rule("dfa"))
    assert str(error.value) == ("rule 'dfa' takes scale 'none', not 'match': its B is a map from the output "
                                "error, not a mirror of W")
    # 1 / sqrt(fan-in), as torch initialises W; a layer without inputs has no range to draw from.
    assert default_init_bound(torch.empty(3, 1)) == 1.0 and default_init_bound(torch.empty(3, 4, 2, 2)) == 1 / 4
    assert default_init_bound(torch.empty(3, 0)) == 0.0
