"""Gradients of every rule against torch's own conv/linear gradient functions."""
import copy

import pytest
import torch
from torch import nn

import feedback_alignment as fa
from conftest import LAYER_RULES, assert_matches_plain_layer, scale_for

# Exact comparisons in double precision; float32 and bf16 paths are tested elsewhere.
pytestmark = pytest.mark.usefixtures("float64")

CONV_CONFIGS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),  # depthwise
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same", dilation=1),  # asymmetric
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="circular"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="replicate", stride=2),
]


def _converted_copy(module, rule, seed=0):
    return fa.convert(copy.deepcopy(module), rule=rule, scale=scale_for(rule), seed=seed)


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_gradients_match_torch(rule, config):
    torch.manual_seed(0)
    reference = nn.Conv2d(**config)
    layer = _converted_copy(reference, rule)
    x = torch.randn(2, config["in_channels"], 11, 10)
    # Input gradient through B: torch's own conv backward of the same layer carrying B as weight.
    grad, grad_plain, grad_output = assert_matches_plain_layer(reference, layer, x)
    feedback = layer.feedback_weight.detach()
    if config.get("padding_mode", "zeros") == "zeros" and not isinstance(config.get("padding"), str):
        expected = torch.nn.grad.conv2d_input(x.shape, feedback, grad_output, reference.stride,
                                              reference.padding, reference.dilation, reference.groups)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    if rule == "bp":
        torch.testing.assert_close(grad, grad_plain, rtol=0, atol=0)


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("shape", [(7,), (5, 7), (3, 4, 7), (2, 3, 2, 7)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients_match_torch(rule, shape, bias):
    torch.manual_seed(1)
    reference = nn.Linear(7, 6, bias=bias)
    layer = _converted_copy(reference, rule)
    x = torch.randn(shape)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = reference(x_ref), layer(x_new)
    torch.testing.assert_close(out_new, out_ref, rtol=0, atol=0)
    grad_output = torch.randn_like(out_ref)
    out_ref.backward(grad_output)
    out_new.backward(grad_output)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-12, atol=1e-12)
    expected = torch.matmul(grad_output, layer.feedback_weight.detach())
    torch.testing.assert_close(x_new.grad, expected, rtol=1e-12, atol=1e-12)


def test_feedback_is_not_weight_for_asymmetric_rules():
    torch.manual_seed(0)
    for rule in ("fa", "usf", "brsf", "frsf", "kp", "wm"):
        layer = fa.convert(nn.Linear(8, 8), rule=rule, scale=scale_for(rule))
        layer(torch.randn(2, 8))
        assert not torch.allclose(layer.feedback_weight, layer.weight), rule


def test_a_converted_layer_prints_its_rule_scale_and_weight_norm_constraint():
    plain = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Linear(4, 5))
    layers = fa.convert(copy.deepcopy(plain), rule="frsf", scale="match", seed=0)
    assert repr(layers[0]) == "FeedbackConv2d(2, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), rule=frsf, scale=match)"
    assert repr(layers[1]) == "FeedbackLinear(in_features=4, out_features=5, bias=True, rule=frsf, scale=match)"
    constrained = fa.convert(copy.deepcopy(plain), rule="usf", scale="none", seed=0, constrain_weight_norm=True)
    assert repr(constrained[1]) == ("FeedbackLinear(in_features=4, out_features=5, bias=True, rule=usf, scale=none, "
                                    "constrain_weight_norm=True)")


def test_refreshing_for_a_given_weight_makes_b_from_that_weight():
    # What the model's pre-hook does for weights that hooks or parametrizations make.
    layer = fa.convert(nn.Linear(6, 4), rule="usf", scale="none", seed=0)
    other = -layer.weight.detach().clone()
    layer.refresh_feedback_(other)
    assert torch.equal(torch.sign(layer.feedback_weight), torch.sign(other))
    layer.refresh_feedback_()
    assert torch.equal(torch.sign(layer.feedback_weight), torch.sign(layer.weight.detach()))


def test_a_converted_layers_state_holds_b_and_its_streams_position_not_what_it_derives():
    """What a checkpoint of each rule's layer holds: the stream's seed and position, B's direction
    and gain; frsf its fixed magnitudes, fa its fixed direction's norm (one norm per step under
    scaling), a constrained layer its norm target. The stream's key is derived from the seed and
    the layer's name: not saved."""
    base = {"weight", "bias", "feedback_seed", "feedback_draws"}
    with_feedback = base | {"feedback_direction", "feedback_gain"}
    special = {"bp": base, "fa": with_feedback | {"feedback_direction_norm"},
               "frsf": with_feedback | {"feedback_magnitude"}}
    for rule in fa.RULES:
        layer = fa.convert(nn.Linear(3, 2), rule=rule, scale=scale_for(rule), seed=0)
        assert set(layer.state_dict()) == special.get(rule, with_feedback), rule
    constrained = fa.convert(nn.Linear(3, 2), rule="usf", scale="none", seed=0, constrain_weight_norm=True)
    assert set(constrained.state_dict()) == with_feedback | {"weight_norm_target"}
    with pytest.raises(ValueError) as error:
        fa.convert(nn.Linear(3, 2), rule="kp", scale="match")
    assert str(error.value) == "rule 'kp' takes scale 'none', not 'match': its B is learned"
    from feedback_alignment.layers import from_module
    with pytest.raises(ValueError) as error:  # a layer made alone checks it too
        from_module(nn.Linear(3, 2), "head", "kp", "match", 0, False)
    assert str(error.value) == "rule 'kp' takes scale 'none', not 'match': its B is learned"
