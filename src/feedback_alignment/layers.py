"""Conv2d and Linear layers whose backward sends the error through a feedback weight B.

Forward, weight gradient and bias gradient are exactly those of nn.Conv2d / nn.Linear; only the
input gradient uses B instead of W. The weight gradient of a convolution depends on the weight's
shape alone, so a single `convolution_backward` call given B in W's place yields all three
gradients at the cost of plain backprop.

B is kept as a direction and a gain, B = feedback_direction * feedback_gain, both buffers (with
the fixed random magnitudes of frsf and the draw counter): saved in state_dict, moved by .to(),
never seen by an optimizer (except under Kolen-Pollack, whose B the optimizer learns: there
feedback_direction is a Parameter, and its gradient is W's). Keeping the gain apart means
`scale="match"` costs one norm per step instead of rewriting every entry of B; the backward
applies the gain to B or to the input gradient, whichever is smaller. dfa's layers use the
Function of direct.py instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import draws
from .direct import DirectFeedbackFunction, DirectFeedbackSource
from .native import SquaredNorms
from .rules import Rule, check_scale, default_init_bound, get_rule

# The overload itself: calling the packet resolves it anew on every call.
_convolution_backward = torch.ops.aten.convolution_backward.default


def _apply_gain(feedback: Tensor, gain: Tensor | None, grad_input_numel: int):
    """(B, factor for the input gradient): B = direction * gain is linear in the gain, so scale
    whichever is smaller, the direction or the input gradient. No gain (scale "none"): B as is."""
    if gain is None:
        return feedback, None
    if gain.dtype != feedback.dtype:
        gain = gain.to(feedback.dtype)
    if feedback.numel() <= grad_input_numel:
        return feedback * gain, None
    return feedback, gain


# In both Functions, `direction` needs a gradient only under Kolen-Pollack, and then it is the
# weight's gradient: computed once, handed to both. `gain` is None where it is 1 for good.

class _FeedbackConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, direction, gain, stride, padding, dilation, groups):
        ctx.save_for_backward(input, direction, gain)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, direction, gain = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_input, need_weight, need_bias, need_direction = ctx.needs_input_grad[:4]
        feedback, input_factor = _apply_gain(direction.detach(), gain, input.numel() if need_input else 0)
        grad_input, grad_weight, grad_bias = _convolution_backward(
            grad_output, input, feedback, ctx.bias_sizes,
            stride, padding, dilation, False, [0, 0], groups,
            [need_input, need_weight or need_direction, need_bias and ctx.bias_sizes is not None],
        )
        if grad_input is not None and input_factor is not None:
            grad_input = grad_input.mul_(input_factor)
        grad_direction = grad_weight if need_direction else None
        return (grad_input, grad_weight if need_weight else None, grad_bias, grad_direction,
                None, None, None, None, None)


class _FeedbackLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, direction, gain):
        ctx.save_for_backward(input, direction, gain)
        ctx.has_bias = bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, direction, gain = ctx.saved_tensors
        need_input, need_weight, need_bias, need_direction = ctx.needs_input_grad[:4]
        grad_input = grad_weight = grad_bias = None
        if need_input:
            feedback, input_factor = _apply_gain(direction.detach(), gain, input.numel())
            grad_input = grad_output.matmul(feedback)
            if input_factor is not None:
                grad_input = grad_input.mul_(input_factor)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        if need_weight or need_direction:
            grad_weight = flat_grad.t().mm(input.reshape(-1, input.shape[-1]))
        if need_bias and ctx.has_bias:
            grad_bias = flat_grad.sum(0)
        grad_direction = grad_weight if need_direction else None
        return grad_input, grad_weight if need_weight else None, grad_bias, grad_direction, None


def frobenius_norm(tensor: Tensor) -> Tensor:
    """||tensor||_F. A BLAS dot product of a dense tensor with itself is about twice as fast on a
    CPU as torch.linalg.vector_norm, and on large weights no less accurate; it runs per layer per
    step under scale="match"."""
    if tensor.is_contiguous() and tensor.dtype in (torch.float32, torch.float64):
        flat = tensor.view(-1)
        return torch.dot(flat, flat).sqrt()
    return torch.linalg.vector_norm(tensor)


def _cast_for_autocast(device_type: str, *tensors):
    """What autocast would do to conv2d/linear arguments; our Function then runs outside autocast
    so that forward and backward see one dtype (the bf16 crash the peers have)."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class FeedbackLayer:
    """State and per-step work shared by FeedbackConv2d and FeedbackLinear (a mixin)."""

    rule: Rule
    scale: str

    def _setup_feedback(self, rule: str, scale: str, seed: int, name: str,
                        constrain_weight_norm: bool) -> None:
        self.rule = get_rule(rule)
        self.scale = check_scale(scale, self.rule)
        self.seed = int(seed)
        self.layer_name = name
        self.constrain_weight_norm = bool(constrain_weight_norm)
        weight = self.weight.detach()
        self.init_bound = default_init_bound(weight)
        if self.constrain_weight_norm:
            self.register_buffer("weight_norm_target", frobenius_norm(weight).to(torch.float32))
        # Whether refresh_feedback_ has anything to do before a training forward.
        self._refreshes = self.constrain_weight_norm or (
            self.rule.write_feedback is not None and (not self.rule.fixed_direction or self.scale == "match"))
        # Counts random draws, so that a resumed or replicated layer continues the same stream.
        self.register_buffer("feedback_draws", torch.zeros((), dtype=torch.int64))
        if self.rule.write_feedback is None:  # bp: B is W itself, nothing to keep
            return
        if self.rule.signal == "direct":
            # classes x input size, drawn at the first training forward (sizes unknown until then).
            self.register_buffer("feedback_direction", weight.new_empty(0))
            self.register_buffer("feedback_gain", torch.ones((), dtype=weight.dtype, device=weight.device))
            self.direct_source: DirectFeedbackSource | None = None  # set by convert
            return
        if self.rule.keeps_magnitude:
            self.register_buffer("feedback_magnitude", torch.empty_like(weight))
            self._draw_uniform(self.feedback_magnitude, 0.0, self.init_bound)
        self.register_buffer("feedback_direction", torch.empty_like(weight))
        self.register_buffer("feedback_gain", torch.ones((), dtype=weight.dtype, device=weight.device))
        self._write_raw_feedback()
        if self.rule.learning == "gradient":  # trained by the optimizer, beside W
            self.feedback_direction = nn.Parameter(self._buffers.pop("feedback_direction"))
        if self.rule.fixed_direction and self.rule.scalable:  # one norm per step, not two
            self.register_buffer("feedback_direction_norm", frobenius_norm(self.feedback_direction))
        if self.scale != "none":
            self.feedback_gain.fill_(self._norm_ratio())

    # -- random draws ---------------------------------------------------------------------
    def _draw_uniform(self, tensor: Tensor, low: float, high: float,
                      per_step: bool | None = None, sign_of: Tensor | None = None):
        """Fill `tensor` with the layer's next draw from U(low, high) and return it; or with U(0,
        high) times sign(sign_of) (a random-magnitude copy of sign_of's signs) and return the
        squared norms of both if the fused CPU kernel summed them, else None. Draws made before
        every step (brsf's magnitudes, wm's mirror noise: per_step) take the cheap 16-bit path;
        draws made once keep full precision. By default the rule's randomness says which."""
        draw = int(self.feedback_draws)
        self.feedback_draws.add_(1)
        if per_step is None:
            per_step = self.rule.randomness == "every_step"
        if sign_of is None:
            fill = draws.fast_uniform_ if per_step else draws.uniform_
            return fill(tensor, low, high, self.seed, self.layer_name, draw)
        if low != 0:
            raise ValueError(f"a draw with the signs of another tensor takes magnitudes from 0, not {low}")
        if per_step:
            return draws.fast_uniform_times_sign_(tensor, high, sign_of, self.seed, self.layer_name, draw)
        draws.uniform_(tensor, 0.0, high, self.seed, self.layer_name, draw).mul_(torch.sign(sign_of))
        return None

    # -- per-step work --------------------------------------------------------------------
    def _write_raw_feedback(self) -> SquaredNorms | None:
        return self.rule.write_feedback(self.weight.detach(), self.feedback_direction, self._draw_uniform,
                                        self.init_bound, getattr(self, "feedback_magnitude", None))

    def _norm_ratio(self, norms: SquaredNorms | None = None) -> Tensor | float:
        """||W|| / ||direction||, from `norms` where the kernel that wrote B summed them."""
        if norms is not None:
            tiny = torch.finfo(self.feedback_direction.dtype).tiny
            return math.sqrt(norms.weight) / max(math.sqrt(norms.feedback), tiny)
        weight_norm = frobenius_norm(self.weight.detach())
        direction_norm = (self.feedback_direction_norm if self.rule.fixed_direction
                          else frobenius_norm(self.feedback_direction))
        # The direction is 0 only where W = 0 everywhere; the clamp keeps B = 0 there, not NaN.
        return weight_norm / direction_norm.clamp_min(torch.finfo(direction_norm.dtype).tiny)

    @torch.no_grad()
    def refresh_feedback_(self) -> None:
        """Bring W and B up to date before a training forward: weight-norm constraint, signs of
        the current W, a fresh draw (brsf), and the feedback scale."""
        if self.constrain_weight_norm:
            weight = self.weight
            weight.mul_(self.weight_norm_target / frobenius_norm(weight))
        if self.rule.write_feedback is None:
            return
        norms = None
        if not self.rule.fixed_direction:
            norms = self._write_raw_feedback()
        if self.scale == "match":
            self.feedback_gain.fill_(self._norm_ratio(norms))

    def _refreshes_before_forward(self) -> bool:
        """Whether a forward now must bring B up to date first: in training, with per-step work
        to do, and B not frozen by alignment.measure."""
        return self.training and self._refreshes and not self._feedback_frozen

    # W's version counter when refresh_ahead_of_forward refreshed this layer; None otherwise.
    _refreshed_at_version: int | None = None

    def _refresh_unless_done_ahead(self) -> None:
        """The per-step refresh, unless the model's pre-hook did it for this forward (and W has
        not changed in place since: an optimizer step in between means refreshing again)."""
        done_at, self._refreshed_at_version = self._refreshed_at_version, None
        if done_at is None or done_at != self.weight._version:
            self.refresh_feedback_()

    @property
    def feedback_weight(self) -> Tensor:
        """B, the matrix the backward of the latest forward sends the error through (for dfa:
        classes x input size, applied to the model's output error)."""
        if self.rule.write_feedback is None:
            return self.weight
        return self.feedback_direction.detach() * self.feedback_gain

    # -- direct feedback (dfa) ------------------------------------------------------------
    @torch.no_grad()
    def _direct_feedback(self, input: Tensor) -> Tensor:
        """This layer's B for the model's output error, drawn on first use."""
        size = input[0].numel()
        if self.feedback_direction.numel() == 0:
            classes = self.direct_source.num_classes
            self.feedback_direction = self.feedback_direction.new_empty(classes, size)
            bound = 1.0 / classes ** 0.5
            self._draw_uniform(self.feedback_direction, -bound, bound)
        elif self.feedback_direction.shape[1] != size:
            raise ValueError(f"dfa layer {self.layer_name!r} got inputs of {size} values per example; "
                             f"its feedback was drawn for {self.feedback_direction.shape[1]}")
        return self.feedback_direction

    def _feedback_forward(self, input: Tensor, conv_args: tuple | None) -> Tensor:
        """The layer's output through the rule's autograd Function (conv_args None: linear),
        under autocast with the dtypes autocast would give conv2d / linear."""
        weight, bias, feedback = self.weight, self.bias, self.feedback_direction
        if self.rule.signal == "direct":
            if self.direct_source is None:
                raise RuntimeError(f"dfa layer {self.layer_name!r} is not part of a model converted "
                                   "with fa.convert(model, rule='dfa')")
            if input.requires_grad:
                feedback = self._direct_feedback(input)
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type):
            input, weight, bias, feedback = _cast_for_autocast(device_type, input, weight, bias, feedback)
            with torch.autocast(device_type, enabled=False):
                return self._apply_function(input, weight, bias, feedback, conv_args)
        return self._apply_function(input, weight, bias, feedback, conv_args)

    def _apply_function(self, input, weight, bias, feedback, conv_args):
        if self.rule.signal == "direct":
            return DirectFeedbackFunction.apply(input, weight, bias, feedback, self.direct_source.current,
                                                self.layer_name, conv_args)
        gain = None if self.scale == "none" else self.feedback_gain  # under "none" it stays 1
        if conv_args is None:
            return _FeedbackLinearFunction.apply(input, weight, bias, feedback, gain)
        return _FeedbackConv2dFunction.apply(input, weight, bias, feedback, gain, *conv_args)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dfa B not drawn yet is empty: take the saved one's shape before loading into it.
        key = prefix + "feedback_direction"
        if self.rule.signal == "direct" and key in state_dict and self.feedback_direction.numel() == 0:
            self.feedback_direction = self.feedback_direction.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # Set by alignment.measure: keep B as it is (no redraw, no rescale) and/or run as exact backprop.
    _feedback_frozen = False
    _exact_backprop = False

    def _uses_feedback_path(self, input: Tensor) -> bool:
        # Plain layer when no gradient can flow (inference costs exactly the plain layer) and for bp.
        return (self.rule.write_feedback is not None and not self._exact_backprop
                and torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad))

    def extra_repr(self) -> str:
        norm = ", constrain_weight_norm=True" if self.constrain_weight_norm else ""
        return f"{super().extra_repr()}, rule={self.rule.name}, scale={self.scale}{norm}"


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    """nn.Conv2d whose input gradient flows through `feedback_weight`."""

    def forward(self, input: Tensor) -> Tensor:
        if self._refreshes_before_forward():
            self._refresh_unless_done_ahead()
        if not self._uses_feedback_path(input):
            return self._conv_forward(input, self.weight, self.bias)
        input, padding = self._pad(input)
        return self._feedback_forward(input, (list(self.stride), padding, list(self.dilation), self.groups))

    def _pad(self, input: Tensor) -> tuple[Tensor, list[int]]:
        """Turn every padding form into explicit symmetric zero padding that convolution_backward
        understands; other padding is applied by F.pad, whose gradient autograd handles exactly."""
        if self.padding_mode != "zeros":
            return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), [0, 0]
        if self.padding == "valid":
            return input, [0, 0]
        if self.padding == "same":
            left_right = self._reversed_padding_repeated_twice  # (w_left, w_right, h_left, h_right)
            if left_right[0] == left_right[1] and left_right[2] == left_right[3]:
                return input, [left_right[2], left_right[0]]
            return F.pad(input, left_right), [0, 0]
        return input, list(self.padding)


class FeedbackLinear(FeedbackLayer, nn.Linear):
    """nn.Linear whose input gradient flows through `feedback_weight`; inputs of any rank."""

    def forward(self, input: Tensor) -> Tensor:
        if self._refreshes_before_forward():
            self._refresh_unless_done_ahead()
        if not self._uses_feedback_path(input):
            return F.linear(input, self.weight, self.bias)
        return self._feedback_forward(input, None)


def refresh_ahead_of_forward(model: nn.Module, args) -> None:
    """A forward pre-hook (convert puts it on the model): refresh every feedback layer of `model`
    in one go before its forward, instead of each layer in its own forward between the
    convolutions. The outcome is the same; the time is not: on ResNet-20, brsf's step costs
    1.03x plain this way and 1.06-1.08x refreshing layer by layer (BENCHMARKS.md). Under
    torch.compile each layer refreshes itself, as before."""
    if torch.compiler.is_compiling():
        return
    for layer in model.modules():
        if isinstance(layer, FeedbackLayer) and layer._refreshes_before_forward():
            layer.refresh_feedback_()
            layer._refreshed_at_version = layer.weight._version


def from_module(module: nn.Module, name: str, rule: str, scale: str, seed: int,
                constrain_weight_norm: bool) -> FeedbackLayer:
    """A feedback layer that takes over `module`'s Parameters, buffers and hooks (no copies)."""
    cls = FeedbackConv2d if type(module) is nn.Conv2d else FeedbackLinear
    layer = cls.__new__(cls)
    state = module.__dict__.copy()
    for container in ("_parameters", "_buffers", "_modules"):
        state[container] = state[container].copy()
    layer.__dict__.update(state)
    layer._setup_feedback(rule, scale, seed, name, constrain_weight_norm)
    return layer
