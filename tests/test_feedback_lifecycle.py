"""B's life cycle in ordinary research code: several forwards before one backward, activation
checkpointing, eval-mode training, weights made by hooks and parametrizations, Kolen-Pollack's
optimizer, the seed in the state, the meta device, torch.func. References are computed by hand
from the B each forward used, or by an unconverted copy of the model."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from torch.utils.checkpoint import checkpoint

import feedback_alignment as fa
from conftest import LAYER_RULES, scale_for

# Rules whose B changes between two forwards when W changes (or, brsf, always).
FOLLOWS_W = ("usf", "brsf", "frsf")


def _change(layer, rule):
    """What happens between two forwards of one step in research code: here W moves (a rule's B
    follows it) and, for weight mirrors, a mirror phase runs."""
    with torch.no_grad():
        layer.weight.mul_(-1.5)
    if rule == "wm":
        fa.mirror.mirror_step(layer)


@pytest.mark.filterwarnings("ignore:.* W moved but its B did not")  # W moves by hand here, B does not: a learned B says so
@pytest.mark.parametrize("rule", [r for r in LAYER_RULES if r != "bp"])
def test_two_forwards_before_one_backward_each_use_their_own_feedback(rule, fused_kernel):
    torch.manual_seed(0)
    layer = fa.convert(nn.Conv2d(3, 4, 3, padding=1), rule=rule, scale=scale_for(rule))
    x1 = torch.randn(2, 3, 5, 5, requires_grad=True)
    x2 = torch.randn(2, 3, 5, 5, requires_grad=True)
    out1 = layer(x1)
    feedback1 = layer.feedback_weight.detach().clone()
    _change(layer, rule)
    out2 = layer(x2)
    feedback2 = layer.feedback_weight.detach().clone()
    g1, g2 = torch.randn_like(out1), torch.randn_like(out2)
    ((out1 * g1).sum() + (out2 * g2).sum()).backward()
    for x, g, feedback in ((x1, g1, feedback1), (x2, g2, feedback2)):
        expected = torch.nn.grad.conv2d_input(x.shape, feedback, g, padding=1)
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    if rule in FOLLOWS_W or scale_for(rule) == "match" or rule == "wm":
        assert not torch.allclose(feedback1, feedback2)


def test_no_copy_of_feedback_when_no_pending_backward_holds_it():
    layer = fa.convert(nn.Linear(5, 4), rule="brsf", scale="match")
    storage = layer.feedback_direction.untyped_storage().data_ptr()
    for _ in range(3):  # the ordinary loop: one forward, its backward, the next forward
        layer(torch.randn(2, 5, requires_grad=True)).sum().backward()
    assert layer.feedback_direction.untyped_storage().data_ptr() == storage
    retained = layer(torch.randn(2, 5, requires_grad=True)).sum()
    retained.backward(retain_graph=True)
    layer(torch.randn(2, 5))  # B is rewritten in place; the retained graph keeps a copy
    assert layer.feedback_direction.untyped_storage().data_ptr() == storage


def test_retained_graph_replays_its_own_feedback():
    torch.manual_seed(0)
    layer = fa.convert(nn.Linear(5, 4), rule="brsf", scale="match")
    x = torch.randn(2, 5, requires_grad=True)
    out = layer(x)
    feedback = layer.feedback_weight.clone()
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    layer(torch.randn(2, 5, requires_grad=True))  # a new draw
    x.grad = None
    out.sum().backward()
    torch.testing.assert_close(x.grad, first)
    torch.testing.assert_close(x.grad, torch.ones(2, 4) @ feedback)


def test_a_module_used_twice_in_one_forward_gets_a_draw_for_each_use():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = fa.convert(nn.Sequential(shared, nn.ReLU(), shared), rule="brsf", scale="match")
    layer = model[0]
    used = []
    layer.register_forward_hook(lambda m, args, out: used.append(m.feedback_weight.clone()))
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    (model(x) * g).sum().backward()
    assert len(used) == 2 and not torch.equal(used[0], used[1])
    hidden = F.linear(x.detach(), layer.weight.detach(), layer.bias.detach())
    expected = ((g @ used[1]) * (hidden > 0)) @ used[0]
    torch.testing.assert_close(x.grad, expected)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


# A part of the model, or the whole of it: then the recomputation in backward runs the converted
# model's own pre-hook again, which must not refresh (brsf: draw) anything.
@pytest.mark.parametrize("whole", [False, True], ids=["part", "whole"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("rule", ["brsf", "usf", "fa"])
def test_checkpointing_replays_the_same_draw(rule, reentrant, whole):
    plain = fa.convert(_net(), rule=rule, scale="match", seed=1)
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(3, 2, 5, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    for step in range(2):  # the second step's W has moved: B must follow it
        outputs = {}
        for name, model in (("plain", plain), ("checkpointed", checkpointed)):
            model.zero_grad()
            xi = x.detach().clone().requires_grad_()
            if name == "plain":
                out = model(xi)
            elif whole:
                out = checkpoint(model, xi, use_reentrant=reentrant)
            else:
                hidden = checkpoint(model[:4], xi, use_reentrant=reentrant)
                out = model[4:](hidden)
            F.cross_entropy(out, y).backward()
            outputs[name] = xi.grad
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.5 * p.grad)
        torch.testing.assert_close(outputs["checkpointed"], outputs["plain"])
        for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
            torch.testing.assert_close(b, a, msg=name)
        for (name, a), (_, b) in zip(fa.feedback_layers(plain), fa.feedback_layers(checkpointed)):
            assert int(a.feedback_draws) == int(b.feedback_draws), name
            torch.testing.assert_close(b.feedback_weight, a.feedback_weight, msg=name)


def test_non_reentrant_checkpointing_after_two_forwards_uses_each_forwards_feedback():
    plain = fa.convert(_net(), rule="brsf", scale="match", seed=2)
    checkpointed = copy.deepcopy(plain)
    views = [torch.randn(3, 2, 5, 5) for _ in range(2)]
    grads = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        inputs = [v.clone().requires_grad_() for v in views]
        if name == "plain":
            outs = [model(v) for v in inputs]
        else:
            outs = [model[4:](checkpoint(model[:4], v, use_reentrant=False)) for v in inputs]
        (outs[0].square().sum() + outs[1].sum()).backward()
        grads[name] = [v.grad for v in inputs] + [p.grad for p in model.parameters()]
    for a, b in zip(grads["plain"], grads["checkpointed"]):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("rule", ["usf", "brsf"])
def test_eval_mode_training_refreshes_feedback(rule):
    model = fa.convert(_net(), rule=rule, scale="match").eval()  # fine-tuning with frozen batch norm
    conv = model[0]
    draws = int(conv.feedback_draws)
    with torch.no_grad():
        conv.weight.neg_()
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    assert torch.equal(conv.feedback_direction.sign(), conv.weight.sign())
    assert conv.feedback_weight.norm().item() == pytest.approx(conv.weight.norm().item(), rel=1e-6)
    assert int(conv.feedback_draws) == draws + (rule == "brsf")
    with torch.no_grad():  # evaluation draws nothing
        model(torch.randn(2, 2, 5, 5))
    assert int(conv.feedback_draws) == draws + (rule == "brsf")


def _expected_usf_match(weight):
    signs = torch.sign(weight)
    return signs * (weight.norm() / signs.norm())


MADE_DURING_THE_FORWARD = ["spectral_norm", "weight_norm_parametrization", "spectral_norm_parametrization", "prune"]


def _conv_whose_weight_is_made_by(make: str) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    if make == "spectral_norm":
        return torch.nn.utils.spectral_norm(conv)  # W remade by a forward pre-hook, from W_orig
    if make == "weight_norm_parametrization":
        return parametrizations.weight_norm(conv)
    if make == "spectral_norm_parametrization":
        return parametrizations.spectral_norm(conv)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    return conv


@pytest.mark.parametrize("make", MADE_DURING_THE_FORWARD)
def test_weights_made_by_hooks_and_parametrizations_get_their_own_forwards_feedback(make):
    model = fa.convert(nn.Sequential(_conv_whose_weight_is_made_by(make), nn.ReLU()), rule="usf", scale="match")
    layer = model[0]
    assert isinstance(layer, fa.FeedbackConv2d) and isinstance(layer, nn.Conv2d)
    used = []
    layer.register_forward_hook(lambda m, args, out: used.append(m.weight.detach().clone()))
    for step in range(2):
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        g = torch.randn(2, 4, 4, 4)
        with parametrize.cached():  # the hook below reads the W of this forward (spectral norm's
            out = model(x)          # parametrization steps its power iteration at every access)
        feedback = _expected_usf_match(used[-1])
        (out * g).sum().backward()
        expected = torch.nn.grad.conv2d_input(x.shape, feedback, g * (out > 0))
        torch.testing.assert_close(x.grad, expected)
        with torch.no_grad():  # an optimizer step on what W is made from
            for name, p in layer.named_parameters():
                p.add_(torch.randn_like(p))
    if make == "prune":
        assert (layer.feedback_direction == 0).sum() >= layer.weight.numel() // 2


@pytest.mark.parametrize("make", MADE_DURING_THE_FORWARD)
def test_a_weight_made_during_the_forward_gets_one_brsf_draw_per_forward(make):
    # Such a layer refreshes B in its own forward, from that forward's W; the model's pre-hook
    # leaves it alone (had both refreshed it, brsf would draw twice per step).
    model = fa.convert(nn.Sequential(_conv_whose_weight_is_made_by(make), nn.ReLU()), rule="brsf", scale="match")
    layer = model[0]
    assert not layer.refreshes_ahead()
    drawn = int(layer.feedback_draws)
    for forward in range(1, 4):
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        assert int(layer.feedback_draws) == drawn + forward, forward


def test_a_weight_norm_constraint_on_a_parametrized_weight_is_refused():
    conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError) as error:
        fa.convert(nn.Sequential(conv), rule="fa", constrain_weight_norm=True)
    assert str(error.value) == ("module '0': constrain_weight_norm needs W as a Parameter of its own; this layer's W "
                                "is made by a parametrization or hook")
    assert parametrize.is_parametrized(conv)


def test_a_module_without_a_feedback_layer_is_refused_by_name():
    from feedback_alignment.layers import from_module

    with pytest.raises(TypeError) as error:
        from_module(nn.Bilinear(2, 2, 3), "head.mix", "fa", "none", 0, False)
    assert str(error.value) == "module 'head.mix': fa.convert does not convert Bilinear"


# -- Kolen-Pollack and its optimizer ----------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _steps(model, optimizer, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()


def _unstepped_warning() -> warnings.WarningMessage:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)  # built before convert
    model = fa.convert(model, rule="kp")
    with pytest.warns(RuntimeWarning, match="build the optimizer after fa.convert") as caught:
        _steps(model, optimizer)
    [warning] = [w for w in caught if "build the optimizer" in str(w.message)]
    return warning


def test_kp_warns_once_when_no_optimizer_steps_its_feedback():
    assert str(_unstepped_warning().message) == (
        "kp layer '0': W moved but its B did not; a learned B learns only if the optimizer steps it too: build the "
        "optimizer after fa.convert")
    model = fa.convert(_mlp(), rule="kp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))


def test_kps_unstepped_warning_points_at_the_users_line():
    """At the line that called the model (in _steps), not into torch or this package. (Not in
    mutmut's runs: its trampolines stand between every mutated function and its caller.)"""
    import linecache

    warning = _unstepped_warning()
    assert warning.filename == __file__ and "model(torch.randn" in linecache.getline(__file__, warning.lineno)


@pytest.mark.parametrize("offset", [-2, -1, 0, 1, 2])
def test_kps_unstepped_warning_reads_w_and_b_apart_whatever_their_counts_of_writes(offset):
    """Tensors count their in-place writes; the check compares W's count with W's and B's with
    B's. Writes made before (an init, a copy) put B's count `offset` ahead of W's: the verdict
    stays the same."""
    model = fa.convert(_mlp(), rule="kp")
    layer = model[0]
    with torch.no_grad():
        while layer.feedback_direction._version - layer.weight._version < offset:
            layer.feedback_direction.mul_(1.0)
        while layer.feedback_direction._version - layer.weight._version > offset:
            layer.weight.mul_(1.0)
    x, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # gradient accumulation: two forwards, nothing stepped between them
            F.cross_entropy(model(x), labels).backward()
        for _ in range(2):  # W and B stepped together between forwards, as a right optimizer does
            with torch.no_grad():
                layer.weight.add_(0.01), layer.feedback_direction.add_(0.01)
            F.cross_entropy(model(x), labels).backward()
    with pytest.warns(RuntimeWarning, match="kp layer '0': W moved but its B did not"):
        with torch.no_grad():
            layer.weight.add_(0.01)  # W alone: a step of an optimizer built without B
        model(x)


@pytest.mark.parametrize("optimizer, warns", [
    (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2), True),
    (lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1e-2), True),
    (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2), False),
    (lambda p: torch.optim.Adam(p, lr=1e-3), False),
    (lambda p: torch.optim.SGD(p, lr=1e-3, weight_decay=1e-2), False),
], ids=["adam-wd", "rmsprop-wd", "adamw", "adam", "sgd-wd"])
def test_kp_warns_about_coupled_weight_decay_in_adaptive_optimizers(optimizer, warns):
    model = fa.convert(_mlp(), rule="kp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(model, optimizer(model.parameters()), steps=2)
    messages = [str(w.message) for w in caught if "couples the decay" in str(w.message)]
    assert len(messages) == (1 if warns else 0), messages


# -- the seed, the meta device, torch.func ------------------------------------------------------

def test_the_seed_travels_in_the_state_dict():
    a = fa.convert(_net(), rule="brsf", scale="match", seed=1)
    a(torch.randn(2, 2, 5, 5)).sum().backward()
    b = fa.convert(_net(), rule="brsf", scale="match", seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 5, 5)
    a(x).sum().backward()
    b(x).sum().backward()
    for (name, la), (_, lb) in zip(fa.feedback_layers(a), fa.feedback_layers(b)):
        assert lb.seed == 1, name
        assert torch.equal(la.feedback_weight, lb.feedback_weight), name
    old = {k: v for k, v in a.state_dict().items() if not k.endswith("feedback_seed")}
    with pytest.raises(RuntimeError, match="feedback_seed"):
        fa.convert(_net(), rule="brsf", seed=1).load_state_dict(old)


@pytest.mark.parametrize("rule", LAYER_RULES + ("dfa",))
def test_convert_on_the_meta_device_draws_when_materialized(rule):
    reference = _net()
    scale = scale_for(rule, "init")
    direct = fa.convert(copy.deepcopy(reference), rule=rule, scale=scale, seed=3)
    with torch.device("meta"):
        lazy = fa.convert(_net(), rule=rule, scale=scale, seed=3)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(reference.state_dict(), strict=False)  # W and biases only
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    for model in (direct, lazy):
        F.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    for (name, a), (_, b) in zip(fa.feedback_layers(direct), fa.feedback_layers(lazy)):
        assert torch.equal(a.feedback_weight, b.feedback_weight), name
        assert int(a.feedback_draws) == int(b.feedback_draws), name
        assert torch.equal(a.weight.grad, b.weight.grad), name


@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "kp"])
def test_torch_func_grad_and_vmap_equal_eager(rule):
    torch.manual_seed(0)
    conv = fa.convert(nn.Conv2d(2, 3, 3, padding=1), rule=rule, scale=scale_for(rule))
    xs = torch.randn(4, 2, 5, 5)

    def loss(x):
        return conv(x).square().sum()

    eager = xs.clone().requires_grad_()
    loss(eager).backward()
    torch.testing.assert_close(torch.func.grad(loss)(xs), eager.grad)
    per_example = torch.func.vmap(torch.func.grad(loss))(xs.unsqueeze(1))  # one (1, C, H, W) each
    torch.testing.assert_close(per_example.squeeze(1), eager.grad)
    torch.testing.assert_close(torch.func.vmap(conv)(xs.unsqueeze(1)).squeeze(1), conv(xs))
    # Gradients with respect to the parameters, through functional_call.
    params = {k: v.detach() for k, v in conv.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(conv, p, (xs,)).square().sum())(params)
    conv.zero_grad()
    loss(xs).backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, getattr(conv, name).grad, msg=name)


def test_a_model_with_a_pending_backward_pickles_and_copies():
    import pickle
    model = fa.convert(_net(), rule="brsf", scale="match")
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    out = model(x)  # its backward is still to come: the layers hold links to the graph
    restored = pickle.loads(pickle.dumps(model))
    copied = copy.deepcopy(model)
    for other in (restored, copied):
        for (name, a), (_, b) in zip(fa.feedback_layers(model), fa.feedback_layers(other)):
            assert torch.equal(a.feedback_weight, b.feedback_weight), name
            assert b._pending_backward == [], name
        other(x).sum().backward()
    out.sum().backward()


def test_nine_forwards_before_their_backwards_keep_the_b_they_saw_through_a_mirror_step():
    # Past eight pending forwards the layer prunes its list of them; the live ones stay listed, so
    # that the mirror phase's in-place change of B leaves them the B they ran with.
    layer = fa.convert(nn.Linear(5, 4), rule="wm", seed=0)
    inputs = [torch.randn(2, 5, requires_grad=True) for _ in range(9)]
    outputs = [layer(x) for x in inputs]
    seen = layer.feedback_weight.detach().clone()
    fa.mirror.mirror_step(layer, lr=0.5, decay=0.5)
    assert not torch.equal(layer.feedback_weight, seen)
    for x, out in zip(inputs, outputs):
        grad = torch.randn_like(out)
        out.backward(grad)
        torch.testing.assert_close(x.grad, grad @ seen)
