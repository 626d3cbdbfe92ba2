"""Property-based tests: converted convolutions and linear maps of random shapes and settings
against torch's own layers. Over any configuration hypothesis draws (1-3 spatial dimensions,
transposed or not, batched or not, stride, every padding form and mode, dilation, groups, bias,
float32 and float64, every rule whose B carries the error from layer to layer), the converted
layer gives torch's output and weight and bias gradients, and as input gradient torch's own
backward of the plain layer carrying B in W's place.

The examples are derandomized (the same ones on every run, so CI is reproducible); a failure
prints the falsifying configuration and a @reproduce_failure line. HYPOTHESIS_PROFILE=explore
draws new ones, 20 times as many per kind.
"""
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import feedback_alignment as fa
from conftest import LAYER_RULES, scale_for

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=800, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CONV_TYPES = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
              (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
DTYPES = [torch.float32, torch.float64]


@st.composite
def conv_layers(draw, spatial: int, transposed: bool, form: str):
    """(plain layer, input): any configuration torch accepts of the given kind; `form` the
    padding's: "int" (numbers per dimension), "valid" or "same" (stride 1 only)."""
    groups = draw(st.integers(1, 3))
    in_channels, out_channels = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    per_dim = st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial)
    kernel, stride = draw(per_dim), ([1] * spatial if form == "same" else draw(per_dim))
    dilation = draw(st.lists(st.integers(1, 2), min_size=spatial, max_size=spatial))
    reach = [d * (k - 1) for k, d in zip(kernel, dilation)]  # input span of one output, minus 1
    kwargs = dict(kernel_size=kernel, stride=stride, dilation=dilation, groups=groups, bias=draw(st.booleans()))
    if transposed:
        padding = [draw(st.integers(0, r // 2)) for r in reach]  # keeps every output size >= 1
        output_padding = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
        kwargs.update(padding=padding, output_padding=output_padding)
        sizes = [draw(st.integers(1, 4)) for _ in range(spatial)]
    else:
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        if form == "int":
            padding = [draw(st.integers(0, 2)) for _ in range(spatial)]
        else:
            padding = form
        pads = padding if form == "int" else [(r + 1) // 2 if form == "same" else 0 for r in reach]
        # Big enough for one output, and for reflect/circular padding (pad below the size).
        sizes = [max(r + 1 - 2 * p, p + 1, 1) + draw(st.integers(0, 3)) for r, p in zip(reach, pads)]
        kwargs.update(padding=padding, padding_mode=mode)
    dtype = draw(st.sampled_from(DTYPES))
    layer = CONV_TYPES[spatial, transposed](in_channels, out_channels, dtype=dtype, **kwargs)
    batch = [draw(st.integers(1, 3))] if draw(st.booleans()) else []  # unbatched inputs too
    x = torch.randn(*batch, in_channels, *sizes, dtype=dtype)
    return layer, x


@st.composite
def linear_layers(draw):
    dtype = draw(st.sampled_from(DTYPES))
    in_features, out_features = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    layer = nn.Linear(in_features, out_features, bias=draw(st.booleans()), dtype=dtype)
    leading = draw(st.lists(st.integers(1, 3), max_size=2))  # rank 1, 2 and 3 inputs
    return layer, torch.randn(*leading, in_features, dtype=dtype)


def assert_matches_torch(reference: nn.Module, rule: str, seed: int, x: torch.Tensor) -> None:
    tolerance = dict(rtol=1e-12, atol=1e-12) if x.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    layer = fa.convert(copy.deepcopy(reference), rule=rule, scale=scale_for(rule), seed=seed)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = reference(x_ref), layer(x_new)
    torch.testing.assert_close(out_new, out_ref, **tolerance)
    grad_output = torch.randn_like(out_ref)
    out_ref.backward(grad_output)
    out_new.backward(grad_output)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, **tolerance)
    if reference.bias is not None:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad, **tolerance)
    through_b = copy.deepcopy(reference)
    with torch.no_grad():
        through_b.weight.copy_(layer.feedback_weight)
    x_b = x.clone().requires_grad_()
    through_b(x_b).backward(grad_output)
    torch.testing.assert_close(x_new.grad, x_b.grad, **tolerance)


# Each kind of convolution and padding form gets its own examples (drawn together, hypothesis
# spends most of them on the simplest kinds).
KINDS = [(spatial, False, form) for spatial in (1, 2, 3) for form in ("int", "valid", "same")] + [
    (spatial, True, "int") for spatial in (1, 2, 3)]


@pytest.mark.parametrize("spatial, transposed, form", KINDS,
                         ids=[f"{CONV_TYPES[s, t].__name__}-{f}" for s, t, f in KINDS])
def test_any_converted_convolution_matches_torch(spatial, transposed, form):
    @given(case=conv_layers(spatial, transposed, form), rule=st.sampled_from(LAYER_RULES),
           seed=st.integers(0, 2**31 - 1))
    def check(case, rule, seed):
        layer, x = case
        assert_matches_torch(layer, rule, seed, x)

    check()


@given(case=linear_layers(), rule=st.sampled_from(LAYER_RULES), seed=st.integers(0, 2**31 - 1))
def test_any_converted_linear_map_matches_torch(case, rule, seed):
    layer, x = case
    assert_matches_torch(layer, rule, seed, x)
