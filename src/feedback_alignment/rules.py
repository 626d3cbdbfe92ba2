"""The learning rules: each is a name and a small function that writes the feedback weight B.

The forward pass and the weight update are the same for every rule; a rule only says which
matrix carries the error backwards in place of W. Adding a rule means adding one `Rule` to
`_REGISTRY` below, nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import native
from .native import SquaredNorms


# How a rule uses randomness:
#   "none"        - B is a function of W alone (bp, usf)
#   "fixed"       - random values drawn once, at conversion (fa, frsf)
#   "every_step"  - random values drawn again before every training forward (brsf)
RANDOMNESS = ("none", "fixed", "every_step")


@dataclass(frozen=True)
class Rule:
    name: str
    # Writes the unscaled feedback of several layers at once (lists, one entry per layer: the
    # per-step refresh of a whole model takes a few multi-tensor operations, not a loop of
    # kernels), in place into `feedbacks` (same shapes as `weights`). Returns each layer's ||B||^2
    # and ||W||^2 if it computed them on the way (the fused CPU kernel), else None.
    # `draw` is the layers' next draw: draw.uniform_(tensors, lows, highs) fills each tensor with
    # U(low, high); draw.uniform_times_sign_(tensors, highs, signs_of) with U(0, high) *
    # sign(sign_of), returning the norms or None. `bounds` are the layers' default init bounds;
    # `magnitudes` the rule's fixed random magnitude buffers (frsf) or None.
    write_feedback: Callable[..., list[SquaredNorms] | None] | None
    randomness: str
    # True when sign(B) == sign(W) everywhere (the sign-concordant family).
    sign_concordant: bool
    # True when B keeps its direction between steps, so "match" only rescales it.
    fixed_direction: bool
    # True when the rule keeps a fixed random magnitude tensor beside B (frsf).
    keeps_magnitude: bool = False
    # Where a layer's error signal comes from: "layer" - back through the next layers' B, as in
    # backprop; "direct" - the output error through the layer's own fixed random matrix (DFA).
    signal: str = "layer"
    # How B learns, if it does: "gradient" - B is a Parameter given W's gradient, so that the
    # optimizer applies W's update and weight decay to it (Kolen-Pollack); "mirror" - B learns
    # from noise sent through the layer between training steps (weight mirrors, mirror.py).
    learning: str | None = None
    description: str = ""

    @property
    def scalable(self) -> bool:
        """Whether the feedback scale techniques apply: not to a B that is learned or that maps
        the output error (a vector of class scores) rather than mirroring W."""
        return self.learning is None and self.signal == "layer"


def _signed(weights: list[Tensor], feedbacks: list[Tensor],
            magnitudes: list[Tensor] | None = None) -> list[SquaredNorms] | None:
    """B = sign(W) * magnitude (1 when None): exactly 0 where W is 0. One fused pass per layer on a
    CPU, else three multi-tensor operations for all layers."""
    triples = list(zip(weights, feedbacks, magnitudes or [None] * len(weights)))
    if all(native.takes(feedback, weight, magnitude) for weight, feedback, magnitude in triples):
        return [native.signed_feedback_(feedback, weight, magnitude) for weight, feedback, magnitude in triples]
    torch._foreach_copy_(feedbacks, weights)
    torch._foreach_sign_(feedbacks)
    if magnitudes is not None:
        torch._foreach_mul_(feedbacks, magnitudes)
    return None


def _fixed_random(weights, feedbacks, draw, bounds, magnitudes) -> None:
    # Drawn once at conversion; afterwards B only changes through rescaling.
    draw.uniform_(feedbacks, [-bound for bound in bounds], bounds)


def _uniform_sign(weights, feedbacks, draw, bounds, magnitudes) -> list[SquaredNorms] | None:
    return _signed(weights, feedbacks)


def _batchwise_random_sign(weights, feedbacks, draw, bounds, magnitudes) -> list[SquaredNorms] | None:
    # |R_t| * sign(W), drawn into B itself (no buffer for magnitudes that live one step).
    return draw.uniform_times_sign_(feedbacks, bounds, weights)


def _fixed_random_sign(weights, feedbacks, draw, bounds, magnitudes) -> list[SquaredNorms] | None:
    return _signed(weights, feedbacks, magnitudes)


_REGISTRY: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("bp", None, "none", sign_concordant=True, fixed_direction=False,
             description="backprop: B = W"),
        Rule("fa", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             description="feedback alignment: fixed random B (Lillicrap et al. 2016)"),
        Rule("usf", _uniform_sign, "none", sign_concordant=True, fixed_direction=False,
             description="uniform sign-concordant feedback: B = sign(W) (Liao et al. 2016)"),
        Rule("brsf", _batchwise_random_sign, "every_step", sign_concordant=True, fixed_direction=False,
             description="batchwise random-magnitude sign-concordant feedback: B = |R_t| * sign(W)"),
        Rule("frsf", _fixed_random_sign, "fixed", sign_concordant=True, fixed_direction=False,
             keeps_magnitude=True,
             description="fixed random-magnitude sign-concordant feedback: B = |R| * sign(W)"),
        # B (classes x the layer's input size) is drawn at the first training forward, when the
        # input size is known; U(-1/sqrt(classes), 1/sqrt(classes)), a Linear's default init.
        Rule("dfa", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             signal="direct",
             description="direct feedback alignment: output error x fixed random B, to every "
                         "layer (Nokland 2016)"),
        Rule("kp", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             learning="gradient",
             description="Kolen-Pollack: B starts random and receives W's update and weight "
                         "decay, so it converges to W (Akrout et al. 2019)"),
        Rule("wm", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             learning="mirror",
             description="weight mirrors: B starts random and learns W from noise in a mirror "
                         "phase (Akrout et al. 2019)"),
    )
}

RULES: tuple[str, ...] = tuple(_REGISTRY)

# none  - raw B: usf is +-1, random rules draw from the layer's default init distribution
# init  - one gain fixed at conversion so that ||B||_F = ||W||_F at that moment
# match - before every training forward, ||B||_F = ||W||_F
SCALES: tuple[str, ...] = ("none", "init", "match")


def get_rule(name: str) -> Rule:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}") from None


def check_scale(scale: str, rule: Rule | None = None) -> str:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    if rule is not None and scale != "none" and not rule.scalable:
        raise ValueError(f"rule {rule.name!r} takes scale 'none', not {scale!r}: its B is "
                         + ("learned" if rule.learning else "a map from the output error, not a mirror of W"))
    return scale


def default_init_bound(weight: Tensor) -> float:
    """Bound of nn.Conv2d / nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in = weight[0].numel()  # in_channels / groups * kernel area, or in_features
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
