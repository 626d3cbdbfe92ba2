"""Feedback layers: torch's convolutions and linear maps whose backward sends the error through a
feedback weight B instead of W (functions.py has the autograd Functions).

B is kept as a direction and a gain, B = feedback_direction * feedback_gain, both buffers (with
the fixed random magnitudes of frsf, the seed and the draw counter): saved in state_dict, moved
by .to(), never seen by an optimizer (except under Kolen-Pollack, whose B the optimizer learns:
there feedback_direction is a Parameter, and its gradient is W's). Keeping the gain apart means
`scale="match"` costs one norm per step instead of rewriting every entry of B.

The life of B, forward by forward:
- B is brought up to date (signs of the current W, brsf's fresh draw, the matched gain, the
  weight-norm constraint) before every forward that records gradients through the layer, in
  training or eval mode alike, after the layer's own pre-hooks and parametrizations have made
  that forward's W. The model's forward pre-hook (convert puts it there) does it for all plain
  layers at once; the rest do it in their own forward.
- Each backward uses the B and gain of its own forward. B is overwritten in place (no copy on
  the hot path) unless a forward whose backward has not run yet still holds it; that backward
  then gets a copy first (copy on write). So two forwards before one backward, a module used
  twice in one forward and retain_graph all see their own B.
- A forward run by the autograd engine during a backward (activation checkpointing recomputing a
  segment) makes no new draw: it uses B as it is, unless W has changed since B was made (the
  checkpointed forward ran without gradients and so never refreshed it).
dfa's layers use the Function of direct.py instead.
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import draws, refresh, regularizers
from .direct import DirectFeedbackFunction, DirectFeedbackSource
from .functions import ConvArgs, FeedbackConvFunction, FeedbackLinearFunction, saved_tensors_alive
from .rules import Rule, check_scale, default_init_bound, get_rule


# Code a warning given during a model's forward is not about: torch's module machinery and this package.
_LIBRARIES = tuple(os.path.dirname(path) + os.sep for path in (torch.__file__, __file__))


def stacklevel_of_caller() -> int:  # pragma: no mutate block (mutmut's trampolines would be the caller)
    """warnings.warn's stacklevel, from the function that gives the warning, of the nearest frame
    outside torch and this package: the user's line that called the model, however many
    containers the call went through."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        level, frame = level + 1, frame.f_back
    return level


def frobenius_norm(tensor: Tensor) -> Tensor:
    """||tensor||_F, as a BLAS dot product of a dense tensor with itself (the norms taken at
    conversion: the weight-norm target, a fixed direction's norm)."""
    if tensor.is_contiguous() and tensor.dtype in (torch.float32, torch.float64):
        flat = tensor.view(-1)
        return torch.dot(flat, flat).sqrt()
    return torch.linalg.vector_norm(tensor)


def _cast_for_autocast(device_type: str, *tensors):
    """What autocast would do to conv/linear arguments; our Function then runs outside autocast
    so that forward and backward see one dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread (a forward called now is
    a recomputation: activation checkpointing)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _same_versions(a, b) -> bool:
    return (a is not None and b is not None and len(a) == len(b)
            and all(x is y and vx == vy for (x, vx), (y, vy) in zip(a, b)))


def _positions(input: Tensor, output: Tensor, conv: ConvArgs | None) -> int:
    """How many times the forward applied the whole weight: output positions of a convolution,
    input positions of a transposed one, input vectors of a linear map (its multiply-adds are
    this times weight.numel())."""
    if conv is None:
        return input.numel() // input.shape[-1]
    return input.numel() // input.shape[1] if conv.transposed else output.numel() // output.shape[1]


class FeedbackLayer:
    """State and per-forward work of every feedback layer (a mixin in front of the torch class)."""

    rule: Rule
    scale: str

    def _setup_feedback(self, rule: str, scale: str, seed: int, name: str,
                        constrain_weight_norm: bool) -> None:
        self.rule = get_rule(rule)
        self.scale = check_scale(scale, self.rule)
        # Positions the latest forward through B applied W at (set for weight mirrors only).
        self.forward_positions: int | None = None
        self.rule_options = self.rule.resolve_options({})  # convert sets the model's own
        self.seed = int(seed)
        self.layer_name = name
        self.constrain_weight_norm = bool(constrain_weight_norm)
        weight = self.weight.detach()
        self.init_bound = default_init_bound(weight)
        # Autograd nodes of forwards that may still need this B (copy on write, module docstring).
        self._pending_backward: list[weakref.ref] = []
        # (tensor, version) pairs of what W was made from when B was last brought up to date.
        self._fresh_for = None
        self._refreshed_ahead = False
        # Whether refresh_feedback_ has anything to do before a forward.
        self._refreshes = self.constrain_weight_norm or (
            self.rule.write_feedback is not None and (not self.rule.fixed_direction or self.scale == "match"))
        # The stream's identity and position travel with the state: a resumed or replicated layer
        # continues the same stream.
        self.register_buffer("feedback_seed", torch.tensor(self.seed, dtype=torch.int64))
        self.register_buffer("feedback_draws", torch.zeros((), dtype=torch.int64))
        # The stream's key (draws.py) where the draws are made, so that a draw on a GPU needs no
        # value from the host; derived from the seed and name, so not saved.
        self.register_buffer("feedback_stream_key", torch.zeros((), dtype=torch.int64, device=weight.device),
                             persistent=False)
        self._set_stream_key()
        # The counter's value on the host: reading the buffer on a GPU would wait for the device.
        # None after compiled code advanced the buffer (host_draw_count reads it back then).
        self._draw_count: int | None = 0
        if self.constrain_weight_norm:
            self.register_buffer("weight_norm_target", torch.empty((), dtype=torch.float32, device=weight.device))
        if self.rule.signal == "direct":
            # classes x input size, drawn at the first forward that needs it (sizes unknown until then).
            self.register_buffer("feedback_direction", weight.new_empty(0))
            self.register_buffer("feedback_gain", torch.ones((), dtype=weight.dtype, device=weight.device))
            self.direct_source: DirectFeedbackSource | None = None  # set by convert
        elif self.rule.write_feedback is not None:
            if self.rule.keeps_magnitude:
                self.register_buffer("feedback_magnitude", torch.empty_like(weight))
            self.register_buffer("feedback_direction", torch.empty_like(weight))
            self.register_buffer("feedback_gain", torch.ones((), dtype=weight.dtype, device=weight.device))
            if self.rule.learns_by_optimizer:  # trained by the optimizer, beside W
                self.feedback_direction = nn.Parameter(self._buffers.pop("feedback_direction"))
                if self.rule.learning == "gradient":
                    self.feedback_direction._kolen_pollack_feedback = True
            if self.rule.fixed_direction and self.rule.scalable:  # one norm per step, not two
                self.register_buffer("feedback_direction_norm", torch.empty((), dtype=weight.dtype,
                                                                            device=weight.device))
        # On the meta device there are no values to draw from: the draws wait for real memory.
        self._awaiting_first_draw = True
        if not weight.is_meta:
            self._draw_initial_feedback(weight)

    @property
    def rule_options(self) -> dict:
        return self._rule_options

    @rule_options.setter
    def rule_options(self, options: dict) -> None:
        self._rule_options = options
        # R's coefficients are worked out here and when training progresses past a schedule's
        # edge, not at every forward.
        # Whether an option is on a schedule over training, so that fa.set_progress has work here.
        self.needs_progress = (self.rule.regularizer is not None
                               and bool(regularizers.scheduled(self.rule.regularizer, options)))
        self._regularizer_terms = None
        if self.rule.regularizer is not None and not self.needs_progress:
            self._regularizer_terms = regularizers.terms(self.rule.regularizer, options)

    def set_progress(self, fraction: float) -> None:
        """How far training is (0 at the first step, 1 at the end), for options on a schedule."""
        if self.needs_progress:
            self._regularizer_terms = regularizers.terms(self.rule.regularizer, self.rule_options, fraction)

    def host_draw_count(self) -> int:
        """The number of draws made so far, from the host's copy of the counter (read back from
        the buffer only after compiled code has advanced it)."""
        if self._draw_count is None:
            self._draw_count = int(self.feedback_draws)
        return self._draw_count

    def _set_stream_key(self) -> None:
        self.stream_key = draws.layer_key(self.seed, self.layer_name)
        if not self.feedback_stream_key.is_meta:
            self.feedback_stream_key.fill_(draws.as_int64(self.stream_key))

    @torch.no_grad()
    def _draw_initial_feedback(self, weight: Tensor) -> None:
        """What conversion sets from W: the norm target, fixed random values, B and its gain."""
        self._awaiting_first_draw = False
        self.feedback_draws.zero_()
        self._draw_count = 0
        self.feedback_seed.fill_(self.seed)
        self._set_stream_key()
        if self.constrain_weight_norm:
            self.weight_norm_target.copy_(frobenius_norm(weight))
        if self.rule.write_feedback is None:
            return
        self.feedback_gain.fill_(1.0)
        if self.rule.signal == "direct":
            return
        if self.rule.keeps_magnitude:
            self._draw_uniform(self.feedback_magnitude, 0.0, self.init_bound)
        refresh.write_feedback([self], [weight])
        if self.rule.fixed_direction and self.rule.scalable:
            self.feedback_direction_norm.copy_(frobenius_norm(self.feedback_direction))
        if self.scale != "none":
            self.feedback_gain.copy_(refresh.norm_ratios([self], [weight])[0])

    def _draws_if_materialized(self, weight: Tensor) -> None:
        """A layer converted on the meta device draws once its tensors hold real memory."""
        if self._awaiting_first_draw and not weight.is_meta:
            self._draw_initial_feedback(weight.detach())

    # -- random draws ---------------------------------------------------------------------
    def _draw_uniform(self, tensor: Tensor, low: float, high: float, per_step: bool | None = None) -> Tensor:
        """Fill `tensor` with the layer's next draw from U(low, high) and return it. Draws made
        before every step (brsf's magnitudes, wm's mirror noise: per_step) take the cheap 16-bit
        levels; draws made once keep full precision. By default the rule's randomness says which."""
        key = refresh.next_host_keys([self])[0]
        if per_step is None:
            per_step = self.rule.randomness == "every_step"
        return (draws.fast_uniform_ if per_step else draws.uniform_)(tensor, low, high, key)

    def _parametrized_weight(self) -> bool:
        # parametrize.is_parametrized without its attribute lookup, which raises and catches an
        # AttributeError on every plain layer (this runs per layer per step).
        parametrizations = self._modules.get("parametrizations")
        return parametrizations is not None and "weight" in parametrizations

    def _weight_versions(self, weight: Tensor) -> tuple:
        """What this forward's W is made from, with the tensors' in-place version counters: the
        parametrization's own tensors for a parametrized W, else W itself (a W remade by a hook
        is a new tensor each time)."""
        if self._parametrized_weight():
            return tuple((t, t._version) for t in self.parametrizations["weight"].parameters())
        return ((weight, weight._version),)

    def refresh_feedback_(self, weight: Tensor | None = None) -> None:
        """Bring W and B up to date for a forward with weight `weight` (default: the layer's):
        weight-norm constraint, signs of the current W, a fresh draw (brsf), the feedback scale.
        (refresh.py; the model's pre-hook does the same for many layers at once.)"""
        refresh.refresh_layers_([self], [self.weight if weight is None else weight])

    def _prepare_feedback(self, weight: Tensor) -> None:
        """Before a forward that records gradients through the layer: B up to date for `weight`."""
        self._draws_if_materialized(weight)
        if self.rule.learns_by_optimizer:
            self._check_feedback_is_stepped(weight)
        # Under torch.func transforms state cannot change (no draws, no buffer writes): those
        # forwards use B as the latest eager forward left it.
        if not self._refreshes or self._feedback_frozen or (
                not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()):
            return
        ahead, self._refreshed_ahead = self._refreshed_ahead, False
        if ahead and torch.compiler.is_compiling():
            # The model's pre-hook ran outside the graph just now: once torch.compile has found a
            # call of it with nothing to trace (the first call under no_grad), it runs the hook
            # eagerly. Refreshing again here would draw brsf's B twice per step.
            return
        if (ahead or in_backward()) and _same_versions(self._fresh_for, self._weight_versions(weight)):
            return  # the model's pre-hook did it for this forward, or this forward is a recomputation
        self.refresh_feedback_(weight)

    def refreshes_ahead(self) -> bool:
        """Whether the model's pre-hook may bring this layer up to date before the model's forward:
        not when the layer's own pre-hooks or parametrization make W during its forward."""
        return (self._refreshes and not self._feedback_frozen and not self._forward_pre_hooks
                and not self._parametrized_weight() and self.weight.requires_grad)

    # -- copy on write ----------------------------------------------------------------------
    def _note_pending_backward(self, output: Tensor) -> None:
        if torch.compiler.is_compiling():  # a compiled graph keeps what its backward needs itself
            return
        node = output.grad_fn
        if node is None:
            return
        if len(self._pending_backward) >= 8:  # forwards whose graph was dropped without a backward
            self._pending_backward[:] = [weakref.ref(n) for n in self._live_pending_nodes()]
        self._pending_backward.append(weakref.ref(node))

    def _live_pending_nodes(self) -> list:
        """The autograd nodes of this layer's forwards whose backward can still run."""
        return [n for ref in self._pending_backward if (n := ref()) is not None and saved_tensors_alive(n)]

    def _copy_for_pending_backward(self, direction: bool, gain: bool) -> None:
        """About to overwrite B's direction and/or gain in place: every forward whose backward has
        not run yet and that holds them gets a copy of its own first."""
        if not self._pending_backward or torch.compiler.is_compiling():
            return
        nodes = self._live_pending_nodes()
        self._pending_backward.clear()
        storage = self.feedback_direction.untyped_storage().data_ptr()
        for node in nodes:
            if direction and node.feedback.untyped_storage().data_ptr() == storage:
                node.feedback = node.feedback.detach().clone()
            if gain and node.gain is self.feedback_gain:
                node.gain = node.gain.clone()

    def _detach_pending_backward_from_feedback(self) -> None:
        """For code that changes B in place outside refresh_feedback_ (weight mirrors)."""
        self._copy_for_pending_backward(direction=True, gain=True)

    # -- a learned B (kp, sa, aa, ia) must be stepped by the optimizer -------------------------
    _feedback_versions: tuple[int, int] | None = None

    def _check_feedback_is_stepped(self, weight: Tensor) -> None:
        """Kolen-Pollack and the alignment regularisers give B a gradient; an optimizer that moves
        W but was built without B (before convert) leaves B where it is, and the rule silently
        becomes fa. Between two training forwards W moved and B did not: say so, once per model."""
        direction = self.feedback_direction
        if torch.compiler.is_compiling() or not direction.requires_grad:
            return
        now = (weight._version, direction._version)
        before, self._feedback_versions = self._feedback_versions, now
        warned = self._warnings
        if before is None or "kp-unstepped" in warned or now[0] == before[0] or now[1] != before[1]:
            return
        warned.add("kp-unstepped")
        warnings.warn(f"{self.rule.name} layer {self.layer_name!r}: W moved but its B did not; a learned B "
                      "learns only if the optimizer steps it too: build the optimizer after fa.convert",
                      RuntimeWarning, stacklevel=stacklevel_of_caller())

    @property
    def _warnings(self) -> set:
        """Warnings already given for this layer's model (convert shares one set among its layers)."""
        if "_shared_warnings" not in self.__dict__:
            self._shared_warnings = set()
        return self._shared_warnings

    @property
    def feedback_weight(self) -> Tensor:
        """B, the matrix the backward of the latest forward sends the error through (for dfa:
        classes x input size, applied to the model's output error)."""
        if self.rule.write_feedback is None:
            return self.weight
        self._draws_if_materialized(self.weight)
        return self.feedback_direction.detach() * self.feedback_gain

    # -- the forward ----------------------------------------------------------------------
    def forward(self, input: Tensor, *args, **kwargs) -> Tensor:
        # The plain layer wherever no gradient is recorded: inference costs exactly the plain layer.
        if not torch.is_grad_enabled():
            return super().forward(input, *args, **kwargs)
        weight = self.weight  # made once per forward, by the parametrization if there is one
        if not (input.requires_grad or weight.requires_grad or self._feedback_learns()):
            return super().forward(input, *args, **kwargs)
        self._prepare_feedback(weight)
        if self.rule.write_feedback is None or self._exact_backprop:
            return super().forward(input, *args, **kwargs)
        return self._forward_through_feedback(input, weight, *args, **kwargs)

    def _feedback_learns(self) -> bool:
        """Whether this forward teaches B (an alignment regulariser reads the layer's data even
        where neither the input nor W needs a gradient)."""
        return self.rule.learning == "regularizer" and self.feedback_direction.requires_grad

    def _forward_through_feedback(self, input: Tensor, weight: Tensor, *args, **kwargs) -> Tensor:
        raise NotImplementedError  # each layer type says how it calls the Function

    def _feedback_output(self, input: Tensor, weight: Tensor, bias: Tensor | None, conv: ConvArgs | None,
                         pad: tuple | None = None, feedback: Tensor | None = None) -> Tensor:
        """The layer's output through the rule's autograd Function (conv None: linear), under
        autocast with the dtypes autocast would give the plain op. `pad` (F.pad's arguments) is
        applied to the input first: by F.pad outside the Function for the layer-to-layer rules,
        inside it for dfa, whose B is sized for the layer's own input. `feedback`: part of the
        direction, for a `weight` that is the same part of W (default: all of it)."""
        if feedback is None:
            feedback = self.feedback_direction
        if self.rule.signal == "direct":
            if self.direct_source is None:
                raise RuntimeError(f"dfa layer {self.layer_name!r} is not part of a model converted "
                                   "with fa.convert(model, rule='dfa')")
            if input.requires_grad:
                feedback = self._direct_feedback(input)
        elif pad is not None:
            input, pad = F.pad(input, *pad), None
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type):
            input, weight, bias, feedback = _cast_for_autocast(device_type, input, weight, bias, feedback)
            with torch.autocast(device_type, enabled=False):
                return self._apply_function(input, weight, bias, feedback, conv, pad)
        return self._apply_function(input, weight, bias, feedback, conv, pad)

    def _apply_function(self, input, weight, bias, feedback, conv, pad):
        if self.rule.signal == "direct":
            return DirectFeedbackFunction.apply(input, weight, bias, feedback, self.direct_source.current,
                                                self.layer_name, conv, pad)
        gain = None if self.scale == "none" else self.feedback_gain  # under "none" it stays 1
        terms = self._regularizer_terms
        if terms is None and self.needs_progress:  # fa.set_progress was never called: the error says to
            regularizers.terms(self.rule.regularizer, self.rule_options, progress=None)
        if conv is None:
            output = FeedbackLinearFunction.apply(input, weight, bias, feedback, gain, terms)
        else:
            output = FeedbackConvFunction.apply(input, weight, bias, feedback, gain, conv, terms)
        self._note_pending_backward(output)
        if self.rule.learning == "mirror":  # the mirror phase sizes its work by the training forward's
            self.forward_positions = _positions(input, output, conv)
        return output

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dfa B not drawn yet is empty: take the saved one's shape before loading into it.
        key = prefix + "feedback_direction"
        if self.rule.signal == "direct" and key in state_dict and self.feedback_direction.numel() == 0:
            self.feedback_direction = self.feedback_direction.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if (draws := state_dict.get(prefix + "feedback_draws")) is not None:
            self._draw_count = int(draws)
        if (seed := state_dict.get(prefix + "feedback_seed")) is not None:
            self.seed = int(seed)  # the saved stream continues, whatever seed this layer was made with
            self._set_stream_key()
            # Loaded values replace the draws that a layer converted on the meta device still owes.
            self._awaiting_first_draw = False
        self._fresh_for = None

    def __getstate__(self):
        # Pickles and deep copies leave behind the links to this process's autograd graph (weak
        # references cannot be pickled) and the W that B was last made from.
        state = super().__getstate__().copy()
        state["_pending_backward"], state["_fresh_for"] = [], None
        return state

    # Set by alignment.measure: keep B as it is (no redraw, no rescale) and/or run as exact backprop.
    _feedback_frozen = False
    _exact_backprop = False

    def extra_repr(self) -> str:
        norm = ", constrain_weight_norm=True" if self.constrain_weight_norm else ""
        return f"{super().extra_repr()}, rule={self.rule.name}, scale={self.scale}{norm}"


# -- the layer types ------------------------------------------------------------------------

class FeedbackConvNd(FeedbackLayer):
    """Convolutions (1-, 2-, 3-d) whose input gradient flows through `feedback_weight`."""

    def _forward_through_feedback(self, input: Tensor, weight: Tensor) -> Tensor:
        spatial = len(self.kernel_size)
        if input.dim() == spatial + 1:  # unbatched, as torch's own layers take it
            return self._forward_through_feedback(input.unsqueeze(0), weight).squeeze(0)
        pad, padding = self._padding()
        conv = ConvArgs(list(self.stride), padding, list(self.dilation), False, [0] * spatial, self.groups)
        return self._feedback_output(input, weight, self.bias, conv, pad)

    def _padding(self) -> tuple[tuple | None, list[int]]:
        """(F.pad's arguments or None, the convolution's own symmetric zero padding): every padding
        form in terms that convolution_backward understands; F.pad's gradient is exact."""
        spatial = len(self.kernel_size)
        pairs = list(self._reversed_padding_repeated_twice)  # (last low, last high, ..., first high)
        if self.padding_mode != "zeros":
            return (pairs, self.padding_mode), [0] * spatial
        if self.padding == "valid":
            return None, [0] * spatial
        if self.padding == "same":
            lows, highs = pairs[0::2], pairs[1::2]
            if lows == highs:
                return None, lows[::-1]
            return (pairs, "constant"), [0] * spatial
        return None, list(self.padding)


class FeedbackConvTransposeNd(FeedbackLayer):
    """Transposed convolutions (1-, 2-, 3-d) whose input gradient flows through `feedback_weight`."""

    def _forward_through_feedback(self, input: Tensor, weight: Tensor, output_size=None) -> Tensor:
        spatial = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, list(self.stride), list(self.padding),
                                              list(self.kernel_size), spatial, list(self.dilation))
        batched = input.dim() == spatial + 2
        conv = ConvArgs(list(self.stride), list(self.padding), list(self.dilation), True,
                        list(output_padding), self.groups)
        output = self._feedback_output(input if batched else input.unsqueeze(0), weight, self.bias, conv)
        return output if batched else output.squeeze(0)


class FeedbackLinearLayer(FeedbackLayer):
    """Linear maps, on inputs of any rank, whose input gradient flows through `feedback_weight`."""

    def _forward_through_feedback(self, input: Tensor, weight: Tensor) -> Tensor:
        return self._feedback_output(input, weight, self.bias, None)


class FeedbackConv1d(FeedbackConvNd, nn.Conv1d):
    """nn.Conv1d whose input gradient flows through `feedback_weight`."""


class FeedbackConv2d(FeedbackConvNd, nn.Conv2d):
    """nn.Conv2d whose input gradient flows through `feedback_weight`."""


class FeedbackConv3d(FeedbackConvNd, nn.Conv3d):
    """nn.Conv3d whose input gradient flows through `feedback_weight`."""


class FeedbackConvTranspose1d(FeedbackConvTransposeNd, nn.ConvTranspose1d):
    """nn.ConvTranspose1d whose input gradient flows through `feedback_weight`."""


class FeedbackConvTranspose2d(FeedbackConvTransposeNd, nn.ConvTranspose2d):
    """nn.ConvTranspose2d whose input gradient flows through `feedback_weight`."""


class FeedbackConvTranspose3d(FeedbackConvTransposeNd, nn.ConvTranspose3d):
    """nn.ConvTranspose3d whose input gradient flows through `feedback_weight`."""


class FeedbackLinear(FeedbackLinearLayer, nn.Linear):
    """nn.Linear whose input gradient flows through `feedback_weight`; inputs of any rank."""


FEEDBACK_CLASSES: dict[type, type] = {
    nn.Conv1d: FeedbackConv1d, nn.Conv2d: FeedbackConv2d, nn.Conv3d: FeedbackConv3d,
    nn.ConvTranspose1d: FeedbackConvTranspose1d, nn.ConvTranspose2d: FeedbackConvTranspose2d,
    nn.ConvTranspose3d: FeedbackConvTranspose3d, nn.Linear: FeedbackLinear,
}
_derived_classes: dict[type, type] = {}


def feedback_class(cls: type) -> type | None:
    """The feedback layer type for a module of type `cls`: ours for torch's own types; for a
    subclass that keeps its base's forward (a parametrized layer, nn.MultiheadAttention's
    out_proj, a user's Linear with extra attributes) a type derived from both; None for a type we
    do not convert or a subclass whose own forward we cannot vouch for."""
    if cls in FEEDBACK_CLASSES:
        return FEEDBACK_CLASSES[cls]
    for base, feedback in FEEDBACK_CLASSES.items():
        if issubclass(cls, base):
            if cls.forward is not base.forward:
                return None
            if cls not in _derived_classes:
                _derived_classes[cls] = type(f"Feedback{cls.__name__}", (feedback, cls),
                                             {"__module__": cls.__module__})
            return _derived_classes[cls]
    return None


def from_module(module: nn.Module, name: str, rule: str, scale: str, seed: int,
                constrain_weight_norm: bool) -> FeedbackLayer:
    """A feedback layer that takes over `module`'s Parameters, buffers, hooks and
    parametrizations (no copies)."""
    cls = feedback_class(type(module))
    if cls is None:
        raise TypeError(f"module {name!r}: fa.convert does not convert {type(module).__name__}")
    if constrain_weight_norm and "weight" not in module._parameters:
        raise ValueError(f"module {name!r}: constrain_weight_norm needs W as a Parameter of its own; this "
                         "layer's W is made by a parametrization or hook")
    layer = take_over(module, cls)
    layer._setup_feedback(rule, scale, seed, name, constrain_weight_norm)
    return layer


def take_over(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` instance holding `module`'s own Parameters, buffers, children and hooks (no copies
    of tensors; the containers are new, so that the two modules can differ from here on)."""
    layer = cls.__new__(cls)
    state = module.__dict__.copy()
    for container in ("_parameters", "_buffers", "_modules"):
        state[container] = state[container].copy()
    layer.__dict__.update(state)
    return layer


def refresh_ahead_of_forward(model: nn.Module, args) -> None:
    """A forward pre-hook (convert puts it on the model): refresh every feedback layer of `model`
    before its forward, the layers of one kind together in a few multi-tensor operations
    (refresh.py), instead of each layer in its own forward between the convolutions. The outcome
    is the same; the time is not (BENCHMARKS.md). Layers whose W is made during their own
    forward, layers under torch.compile and forwards recomputed during a backward refresh
    themselves."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or in_backward():
        return
    groups: dict[tuple, list] = {}
    for layer in model.modules():
        if isinstance(layer, FeedbackLayer) and layer.refreshes_ahead():
            groups.setdefault(refresh.group_key(layer, layer.weight), []).append(layer)
    for layers in groups.values():
        refresh.refresh_layers_(layers, [layer.weight for layer in layers])
        for layer in layers:
            layer._refreshed_ahead = True
