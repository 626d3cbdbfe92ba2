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
    # Writes the unscaled feedback into `feedback` (same shape as `weight`), in place, and returns
    # ||B||^2 and ||W||^2 if it computed them on the way (the fused CPU kernel), else None.
    # `draw_uniform(tensor, low, high)` fills a tensor with U(low, high) from the layer's own
    # generator (`draw_uniform(tensor, 0, high, sign_of=weight)`: U(0, high) * sign(weight),
    # returning the norms or None); `bound` is the layer's default init bound; `magnitude` is
    # the rule's fixed random magnitude buffer (frsf) or None.
    write_feedback: Callable[..., SquaredNorms | None] | None
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


def _signed(weight: Tensor, feedback: Tensor, magnitude: Tensor | None = None) -> SquaredNorms | None:
    """B = sign(W) * magnitude (1 when None): exactly 0 where W is 0. One fused pass on a CPU."""
    if native.takes(feedback, weight, magnitude):
        return native.signed_feedback_(feedback, weight, magnitude)
    torch.sign(weight, out=feedback)
    if magnitude is not None:
        feedback.mul_(magnitude)
    return None


def _fixed_random(weight: Tensor, feedback: Tensor, draw_uniform, bound: float, magnitude) -> None:
    # Drawn once at conversion; afterwards B only changes through rescaling.
    draw_uniform(feedback, -bound, bound)


def _uniform_sign(weight: Tensor, feedback: Tensor, draw_uniform, bound: float, magnitude) -> SquaredNorms | None:
    return _signed(weight, feedback)


def _batchwise_random_sign(weight: Tensor, feedback: Tensor, draw_uniform, bound: float,
                           magnitude) -> SquaredNorms | None:
    # |R_t| * sign(W), drawn into B itself (no buffer for magnitudes that live one step).
    return draw_uniform(feedback, 0.0, bound, sign_of=weight)


def _fixed_random_sign(weight: Tensor, feedback: Tensor, draw_uniform, bound: float,
                       magnitude) -> SquaredNorms | None:
    return _signed(weight, feedback, magnitude)


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
