"""Every weight layer type convert covers, against torch's own layers: forward, weight and bias
gradients equal to the plain layer's; the input gradient equal to torch's own backward of the
same layer carrying B in W's place. Attention against torch's own multi_head_attention_forward
with projections that carry B. What stays exact is named; what cannot work is refused."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import feedback_alignment as fa
from conftest import LAYER_RULES, assert_matches_plain_layer, scale_for
from feedback_alignment.alignment import angle_degrees, measure

pytestmark = pytest.mark.usefixtures("float64")

CONFIGS = [  # (layer type, constructor arguments, input shape, forward extra arguments)
    (nn.Conv1d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (2, 3, 9), {}),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", dilation=1, groups=2), (2, 4, 8), {}),
    (nn.Conv1d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="circular"), (2, 3, 7), {}),
    (nn.Conv1d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (3, 7), {}),  # unbatched
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"), (3, 6, 5), {}),
    (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=(3, 2, 3), stride=(1, 2, 1), padding=1), (2, 2, 5, 6, 5), {}),
    (nn.Conv3d, dict(in_channels=2, out_channels=4, kernel_size=3, padding="same", groups=2, bias=False), (2, 5, 4, 5), {}),
    # "same" with one dimension even (padded 1 and 2) and one odd (1 and 1)
    (nn.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=(4, 3), padding="same"), (2, 2, 6, 5), {}),
    (nn.ConvTranspose1d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1), (2, 3, 6), {}),
    (nn.ConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2, dilation=2), (2, 4, 4, 5), {}),
    (nn.ConvTranspose2d, dict(in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=1), (2, 3, 4, 4),
     dict(output_size=[8, 8])),
    (nn.ConvTranspose2d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, dilation=2), (2, 2, 4, 4),
     dict(output_size=[12, 12])),  # the dilated kernel spans 5: 11 without output padding
    (nn.ConvTranspose2d, dict(in_channels=3, out_channels=2, kernel_size=2, stride=2), (3, 4, 4), {}),  # unbatched
    (nn.ConvTranspose3d, dict(in_channels=2, out_channels=3, kernel_size=2, stride=(2, 1, 2), bias=False), (2, 2, 3, 3, 3), {}),
]


def _config_id(config):
    cls, kwargs, shape, extra = config
    return f"{cls.__name__}-{'x'.join(map(str, shape))}-" + ",".join(f"{k}={v}" for k, v in {**kwargs, **extra}.items())


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_every_convolution_type_matches_torch(rule, config):
    cls, kwargs, shape, extra = config
    torch.manual_seed(0)
    reference = cls(**kwargs)
    layer = fa.convert(copy.deepcopy(reference), rule=rule, scale=scale_for(rule), seed=1)
    assert isinstance(layer, cls) and isinstance(layer, fa.FeedbackLayer)
    assert_matches_plain_layer(reference, layer, torch.randn(shape), **extra)


class ScaledLinear(nn.Linear):
    """A subclass with state of its own and the base forward: converted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.note = "kept"


class OwnForwardLinear(nn.Linear):
    """A subclass with its own forward: left exact, and named."""

    def forward(self, input):
        return super().forward(input) * 2


def _lazy_linear():
    layer = nn.LazyLinear(5)
    layer(torch.randn(1, 6))  # materialized: now an nn.Linear
    return layer


DERIVED = {  # layer, input shape
    "linear-subclass": (lambda: ScaledLinear(6, 5), (3, 6)),
    "lazy-linear": (_lazy_linear, (3, 6)),
    "weight-norm-parametrization": (lambda: torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), (2, 3, 5, 5)),
    "orthogonal-parametrization": (lambda: torch.nn.utils.parametrizations.orthogonal(nn.Linear(6, 5)), (3, 6)),
}


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("case", list(DERIVED), ids=str)
def test_subclasses_parametrized_and_lazy_layers_match_torch(rule, case):
    make, shape = DERIVED[case]
    torch.manual_seed(0)
    reference = make()
    layer = fa.convert(copy.deepcopy(reference), rule=rule, scale=scale_for(rule), seed=1)
    assert isinstance(layer, type(reference)) and isinstance(layer, fa.FeedbackLayer)
    x = torch.randn(shape)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = reference(x_ref), layer(x_new)
    torch.testing.assert_close(out_new, out_ref, rtol=1e-12, atol=1e-12)
    grad_output = torch.randn_like(out_ref)
    out_ref.backward(grad_output)
    out_new.backward(grad_output)
    references = dict(reference.named_parameters())
    for name, parameter in layer.named_parameters():
        if "feedback" not in name:  # W's own tensors, or what a parametrization makes it from
            torch.testing.assert_close(parameter.grad, references[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():
        feedback, weight = layer.feedback_weight.clone(), layer.weight.detach()
    if weight.dim() == 2:
        expected = grad_output @ feedback
    else:
        expected = torch.nn.grad.conv2d_input(x.shape, feedback, grad_output)
    torch.testing.assert_close(x_new.grad, expected, rtol=1e-10, atol=1e-12)


def test_linear_subclasses_convert_unless_they_bring_their_own_forward():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 5), nn.ReLU(), OwnForwardLinear(5, 3))
    with pytest.warns(UserWarning, match=r"1 module\(s\) with weights on exact backprop: 2 \(OwnForwardLinear\)"):
        fa.convert(model, rule="usf")
    assert isinstance(model[0], ScaledLinear) and isinstance(model[0], fa.FeedbackLayer) and model[0].note == "kept"
    assert type(model[2]) is OwnForwardLinear
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.convert(nn.Sequential(ScaledLinear(4, 5), nn.ReLU(), OwnForwardLinear(5, 3)), rule="usf", exclude=("2",))


def test_modules_with_weights_that_stay_exact_are_named_in_one_warning():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.rnn = nn.LSTM(4, 4)
            self.bilinear = nn.Bilinear(4, 4, 3)
            self.norm = nn.LayerNorm(3)
            self.head = nn.Linear(3, 2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fa.convert(Recurrent(), rule="fa")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "2 module(s)" in messages[0] and "rnn (LSTM)" in messages[0] and "bilinear (Bilinear)" in messages[0]
    assert "embed" not in messages[0] and "norm" not in messages[0]


def test_lazy_layers_convert_once_materialized_and_are_refused_before():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"module '0' \(LazyLinear\) is not materialized yet: run one forward"):
        fa.convert(model, rule="fa")
    model(torch.randn(3, 6))
    fa.convert(model, rule="fa")
    assert isinstance(model[0], fa.FeedbackLinear)


def test_a_one_dimensional_conv_net_converts_fully_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.convert(model, rule="frsf", scale="match")
    assert [name for name, _ in fa.feedback_layers(model)] == ["0", "3", "7"]
    x = torch.randn(5, 2, 16, requires_grad=True)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    # The error reaching the input went through the first layer's B.
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


# -- attention ---------------------------------------------------------------------------------

def _through(x, weight, bias, feedback):
    """x @ W^T + b whose input gradient is g @ B, from torch's own ops (the straight-through form)."""
    exact = F.linear(x.detach(), weight, bias)
    return exact + (F.linear(x, feedback) - F.linear(x, feedback).detach())


def _reference_attention(attention, feedback, query, key, value, **kwargs):
    """torch's own F.multi_head_attention_forward, with the projections done outside it by
    `_through` (identity projections inside)."""
    E = attention.embed_dim
    batch_first = attention.batch_first and query.dim() == 3
    if batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    biases = (None,) * 3 if attention.in_proj_bias is None else attention.in_proj_bias.chunk(3)
    if attention._qkv_same_embed_dim:
        weights = attention.in_proj_weight.chunk(3)
        feedbacks = feedback["in_proj_feedback"].chunk(3)
    else:
        weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        feedbacks = tuple(feedback[f"{n}_proj_feedback"] for n in "qkv")
    q, k, v = (_through(x, w, b, f) for x, w, b, f in zip((query, key, value), weights, biases, feedbacks))
    eye = torch.eye(E)
    out, weights = F.multi_head_attention_forward(
        q, k, v, E, attention.num_heads, None, None, attention.bias_k, attention.bias_v, attention.add_zero_attn,
        attention.dropout, eye, None, training=attention.training, use_separate_proj_weight=True,
        q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye, **kwargs)
    out = _through(out, attention.out_proj.weight, attention.out_proj.bias, feedback["out_proj"])
    return (out.transpose(0, 1) if batch_first else out), weights


ATTENTION = {
    "self-batch-first": (dict(embed_dim=8, num_heads=2, batch_first=True), "self", (3, 5, 8), {}),
    "self-masks-weights": (dict(embed_dim=8, num_heads=4), "self", (5, 3, 8),
                           dict(need_weights=True, average_attn_weights=False,
                                attn_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), 1),
                                key_padding_mask=torch.tensor([[False] * 4 + [True]] * 3))),
    "cross-kdim-vdim": (dict(embed_dim=8, num_heads=2, kdim=6, vdim=4, batch_first=True), "cross", (2, 4, 8),
                        dict(need_weights=False)),
    "bias-kv-zero-attn": (dict(embed_dim=6, num_heads=3, add_bias_kv=True, add_zero_attn=True), "cross",
                          (4, 2, 6), {}),
    "unbatched-no-bias": (dict(embed_dim=6, num_heads=2, bias=False), "self", (5, 6), dict(need_weights=False)),
}


@pytest.mark.parametrize("rule", ["fa", "usf", "brsf", "kp"])
@pytest.mark.parametrize("case", list(ATTENTION), ids=str)
def test_attention_sends_the_error_through_its_projections_feedback(rule, case):
    kwargs, kind, shape, call = ATTENTION[case]
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(**kwargs)
    attention = fa.convert(copy.deepcopy(reference), rule=rule, scale=scale_for(rule), seed=2)
    assert isinstance(attention, fa.FeedbackMultiheadAttention)
    query = torch.randn(shape)
    if kind == "self":
        key = value = query
    else:
        source = shape[:-2] + (7,) if len(shape) == 3 and kwargs.get("batch_first") else (7,) + shape[1:-1]
        key = torch.randn(*source, kwargs.get("kdim", kwargs["embed_dim"]))
        value = torch.randn(*source, kwargs.get("vdim", kwargs["embed_dim"]))
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    if kind == "self":
        inputs = [inputs[0]] * 3
    out, weights = attention(*inputs, **call)
    feedback = {name: layer.feedback_weight.detach() for name, layer in fa.feedback_layers(attention)}
    ref_inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    if kind == "self":
        ref_inputs = [ref_inputs[0]] * 3
    ref_out, ref_weights = _reference_attention(attention, feedback, *ref_inputs, **call)
    torch.testing.assert_close(out, ref_out)
    plain_out, _ = reference(query, key, value, **call)
    torch.testing.assert_close(out, plain_out)  # the forward is the plain attention's
    if weights is not None or ref_weights is not None:
        torch.testing.assert_close(weights, ref_weights)
    g = torch.randn_like(out)
    ours = torch.autograd.grad((out * g).sum(), [*dict.fromkeys(inputs), *attention.parameters()], allow_unused=True)
    theirs = torch.autograd.grad((ref_out * g).sum(), [*dict.fromkeys(ref_inputs), *attention.parameters()],
                                 allow_unused=True)
    names = ["input"] * len(dict.fromkeys(inputs)) + [n for n, _ in attention.named_parameters()]
    for name, a, b in zip(names, ours, theirs):
        if name.endswith("feedback_direction"):
            continue  # kp's B gets W's gradient; checked by the kp tests
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.slow
def test_vit_b_16_converts_fully():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.convert(model, rule="fa")
    converted = {id(layer.weight) for _, layer in fa.feedback_layers(model)}
    matrices = [name for name, p in model.named_parameters() if p.dim() >= 2 and "feedback" not in name]
    exact = [name for name, p in model.named_parameters()
             if p.dim() >= 2 and "feedback" not in name and id(p) not in converted]
    assert exact == ["class_token", "encoder.pos_embedding"], exact  # additive, no weight transport
    assert len(matrices) - len(exact) == 1 + 12 * 4 + 1  # patch conv, 4 per block, head
    assert all(isinstance(block.self_attention, fa.FeedbackMultiheadAttention) for block in model.encoder.layers)


def test_a_small_vision_transformer_trains_through_feedback():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=3)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at 0: no error would pass it
    model = fa.convert(model, rule="usf", scale="match")
    frame = measure(model, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    attention = frame[frame.layer.str.contains("self_attention")]
    assert len(attention) == 4  # in_proj_feedback and out_proj of both blocks
    assert (attention.angle_update > 0).all()  # the error reaching attention went through B
    assert (frame.angle_feedback_weight < 90).all()


# -- dfa ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ending, made_by", [(nn.LogSoftmax(dim=1), "LogSoftmaxBackward0"),
                                             (nn.Softmax(dim=1), "SoftmaxBackward0")], ids=["log-softmax", "softmax"])
def test_dfa_refuses_a_model_whose_output_is_not_its_classifiers(ending, made_by):
    torch.manual_seed(0)
    model = fa.convert(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), ending), rule="dfa")
    with pytest.raises(ValueError, match=f"dfa needs the model to return its last layer's output \\(the logits\\), "
                                         f"but this model's output is made by {made_by}: return the logits and apply "
                                         "softmax or log-softmax in the loss"):
        model(torch.randn(2, 4))
    with torch.no_grad():  # nothing to send back: inference is fine
        model(torch.randn(2, 4))


def test_dfa_refuses_a_model_that_returns_no_computed_output():
    class ReturnsItsInput(nn.Module):  # the classifier runs, but the output is the input itself
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(3, 3)

        def forward(self, x):
            self.classifier(x)
            return x

    model = fa.convert(ReturnsItsInput(), rule="dfa")
    with pytest.raises(ValueError, match="this model's output is made by no operation: return the logits"):
        model(torch.randn(2, 3, requires_grad=True))


def test_dfa_feedback_is_sized_for_the_layers_own_input_whatever_the_padding():
    torch.manual_seed(0)
    model = fa.convert(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(3 * 4 * 5, 4)), rule="dfa", seed=0)
    x = torch.randn(2, 2, 4, 5, requires_grad=True)
    logits = model(x)
    logits.retain_grad()
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    feedback = model[0].feedback_weight
    assert feedback.shape == (4, 2 * 4 * 5)
    torch.testing.assert_close(x.grad, (logits.grad @ feedback).view(x.shape))
    reference = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    reference.load_state_dict({k: v for k, v in model[0].state_dict().items() if k in ("weight", "bias")})
    out = reference(x.detach())
    out.backward((logits.grad @ model[3].feedback_weight).view(out.shape) * (out > 0))
    torch.testing.assert_close(model[0].weight.grad, reference.weight.grad)


def test_measure_leaves_a_dfa_model_exactly_as_it_found_it():
    torch.manual_seed(0)
    model = fa.convert(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), rule="dfa", seed=1)
    state = copy.deepcopy(model.state_dict())
    inputs = torch.randn(4, 6)
    rng = torch.get_rng_state()
    frame = measure(model, inputs, torch.tensor([0, 1, 2, 0]))
    assert len(frame) == 2
    after = model.state_dict()
    assert state.keys() == after.keys()
    for key in state:
        assert state[key].shape == after[key].shape and torch.equal(state[key], after[key]), key
    assert torch.equal(torch.get_rng_state(), rng)
    assert model[0].feedback_direction.numel() == 0  # still to be drawn by the first training forward


@pytest.mark.parametrize("make", [lambda: nn.Conv1d(3, 5, 3), lambda: nn.Conv3d(2, 4, 3, groups=2),
                                  lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)],
                         ids=["conv1d", "conv3d-groups", "conv-transpose2d"])
def test_weight_mirrors_learn_w_for_every_convolution_type(make):
    torch.manual_seed(0)
    layer = fa.convert(make(), rule="wm", seed=0)
    # a random B: 90 +- 8 degrees from W in 45 dimensions (this seed's Conv1d draws 65)
    assert angle_degrees(layer.feedback_weight, layer.weight) > 60
    for _ in range(60):
        fa.mirror.mirror_step(layer)
    assert angle_degrees(layer.feedback_weight, layer.weight) < 5
    # B_60 = 0.95^60 B_0 + (1 - 0.95^60) W + noise: W's share 0.954, so ||B|| / ||W|| too (an
    # estimate divided by the wrong number of samples is off by their ratio).
    ratio = float(layer.feedback_weight.norm() / layer.weight.detach().norm())
    assert ratio == pytest.approx(1 - 0.95**60, abs=0.05)


def test_a_transposed_conv_takes_output_size_on_every_path():
    """Where the layer runs plain (no gradient recorded; nothing needs one; the exact-backprop pass
    of alignment.measure) as where it runs through B: output_size, given by position or name."""
    torch.manual_seed(0)
    reference = nn.ConvTranspose2d(2, 3, 3, stride=2)
    layer = fa.convert(copy.deepcopy(reference), rule="usf", scale="none", seed=0)
    frozen = copy.deepcopy(layer).requires_grad_(False)
    x = torch.randn(1, 2, 4, 4)
    expected = reference(x, [10, 10])
    assert expected.shape[-2:] == (10, 10)  # 9 without output padding

    def exact(*args, **kwargs):
        layer._exact_backprop = True
        try:
            return layer(x.detach().requires_grad_(), *args, **kwargs)
        finally:
            layer._exact_backprop = False
    def no_grad(*args, **kwargs):
        with torch.no_grad():
            return layer(x, *args, **kwargs)
    paths = {"through B": lambda *a, **k: layer(x.detach().requires_grad_(), *a, **k), "no gradient": no_grad,
             "nothing needs a gradient": lambda *a, **k: frozen(x, *a, **k), "exact backprop": exact}
    for path, forward in paths.items():
        torch.testing.assert_close(forward([10, 10]), expected, msg=f"{path}, by position")
        torch.testing.assert_close(forward(output_size=[10, 10]), expected, msg=f"{path}, by name")
