"""The learning rules: each is one record saying how it writes the feedback weight B (or how B
learns), which options it takes, and what it does between training steps.

The forward pass and the weight update are the same for every rule; a rule only says which
matrix carries the error backwards in place of W. Adding a rule, options included, means adding
one `Rule` to `_REGISTRY` below (and a module of its own if its work is large, as mirror.py),
nothing else: the training CLI (`--rule-option KEY=VALUE`), the workflow
(`variants.<name>.rule_options`), the bench and the tests take it from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import native
from .native import SquaredNorms


@dataclass(frozen=True)
class Option:
    """A setting of a rule: its default (whose type, int or float, is the option's), its bounds
    (inclusive) and what it means."""
    name: str
    default: int | float
    help: str
    minimum: float | None = None
    maximum: float | None = None

    def check(self, rule: str, value) -> int | float:
        """`value` (a number, or its text from the command line) as the option's type, in bounds."""
        kind = type(self.default)
        try:
            number = kind(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != kind(number):
            wanted = "an integer" if kind is int else "a number"
            raise ValueError(f"rule {rule!r} option {self.name!r} takes {wanted}, not {value!r}")
        number = kind(number)
        if self.minimum is not None and number < self.minimum or self.maximum is not None and number > self.maximum:
            bounds = (f"between {self.minimum} and {self.maximum}" if self.maximum is not None
                      else f"at least {self.minimum}")
            raise ValueError(f"rule {rule!r} option {self.name!r} must be {bounds}, not {number}")
        return number


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
    # optimizer applies W's update and weight decay to it (Kolen-Pollack); "regularizer" - B is
    # a Parameter given the gradient of a regulariser R(B) on the training batch (Kunin et al.,
    # regularizers.py); "mirror" - B learns from noise sent through the layer between training
    # steps (weight mirrors, mirror.py).
    learning: str | None = None
    description: str = ""
    # The rule's own settings; `convert(model, rule, **options)` checks and stores them.
    options: tuple[Option, ...] = ()
    # Work between training steps, after the optimizer's step number `step` (from 1):
    # after_step(model, step, options). Weight mirrors run their mirror phase here.
    after_step: Callable[..., None] | None = None
    # Under learning "regularizer": which primitive of regularizers.py each option weighs.
    regularizer: dict[str, str] | None = None

    def resolve_options(self, given: dict) -> dict:
        """Every option's value: `given` (checked: names and values) over the defaults."""
        known = {option.name: option for option in self.options}
        for name in given:
            if name not in known:
                takes = f"takes {', '.join(known)}" if known else "takes no options"
                raise ValueError(f"rule {self.name!r} has no option {name!r}; it {takes}")
        values = {name: option.check(self.name, given.get(name, option.default)) for name, option in known.items()}
        for name in values:
            start, stop = values.get(f"{name}_start"), values.get(f"{name}_stop")
            if start is not None and stop is not None and start >= stop:
                raise ValueError(f"rule {self.name!r} option {name}_start ({start}) must be below "
                                 f"{name}_stop ({stop}): {name} would never count")
        return values

    def parse_options(self, pairs: list[str], flag: str = "") -> dict:
        """Options written KEY=VALUE (command lines; `flag` names where, in errors), checked,
        defaults filled in."""
        given = {}
        for pair in pairs:
            key, separator, value = pair.partition("=")
            if not separator or not key:
                raise ValueError(f"{flag}{pair!r}: write KEY=VALUE")
            given[key] = value
        return self.resolve_options(given)

    @property
    def learns_by_optimizer(self) -> bool:
        """Whether B is a Parameter that the optimizer steps (kp, sa, aa, ia)."""
        return self.learning in ("gradient", "regularizer")

    @property
    def scalable(self) -> bool:  # pragma: no mutate block (read when the tests are collected)
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


def _mirror_phase(model, step: int, options: dict) -> None:
    from .mirror import mirror_step  # mirror.py works on converted models: imported when used

    if step % options["every"] == 0:
        mirror_step(model, options["lr"], options["decay"], options["batch"], options["budget"])


# Not mutated (TESTING.md): it runs while the registry is built at import, where a mutant's
# failure is an import error, not a failing test.
def _coefficients(**defaults: float) -> tuple[Option, ...]:  # pragma: no mutate block
    """The coefficients of R's terms (the reference implementation's defaults), each with the
    part of training where it counts (constant by default), and one factor on all of them: it
    keeps R's minimum (where B goes) and sets how fast B gets there."""
    coefficients = tuple(
        option
        for name, value in defaults.items()
        for option in (
            Option(name, value, "coefficient of its term of R (regularizers.py)", minimum=0.0),
            Option(f"{name}_start", 0.0, f"fraction of training from which {name} counts (0 before)",
                   minimum=0.0, maximum=1.0),
            Option(f"{name}_stop", 1.0, f"fraction of training from which {name} stops counting",
                   minimum=0.0, maximum=1.0)))
    return coefficients + (
        Option("strength", 1.0, "factor on every coefficient: the same fixed point, reached faster", minimum=0.0),
        Option("examples", 0, "examples of the training batch that R's data terms read (the first ones; "
                              "0: all): fewer cost less, with more noise in B's step", minimum=0))


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
                         "phase (Akrout et al. 2019)",
             options=(Option("lr", 0.05, "B <- (1 - decay) B + lr W_hat per mirror phase", minimum=0.0),
                      Option("decay", 0.05, "see lr", minimum=0.0, maximum=1.0),
                      Option("batch", 16, "noise images per layer per mirror phase (64 positions each; "
                                          "linear layers get as many noise vectors as that makes)", minimum=1),
                      Option("every", 1, "training steps between mirror phases", minimum=1),
                      Option("budget", 0.2, "most multiply-adds of a mirror phase, as a fraction of the "
                                            "training step's: fewer noise images where the layers see few "
                                            "positions (0: no bound)", minimum=0.0)),
             after_step=_mirror_phase),
        # Kunin et al. 2020: B starts random and learns from a regulariser on the training batch.
        Rule("sa", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             learning="regularizer", regularizer={"alpha": "decay", "beta": "self"},
             description="symmetric alignment: R = alpha (||W||^2 + ||B||^2) - beta <W, B> pulls B "
                         "to W (Kunin et al. 2020)",
             options=_coefficients(alpha=1e-3, beta=2e-3)),
        Rule("aa", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             learning="regularizer", regularizer={"alpha": "sparse", "beta": "amp"},
             description="activation alignment: R = alpha (||r||^2 + ||s||^2) - beta <r, s> makes B "
                         "act like W on the data (Kunin et al. 2020)",
             options=_coefficients(alpha=1e-3, beta=2e-3)),
        Rule("ia", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             learning="regularizer", regularizer={"alpha": "amp", "beta": "null", "gamma": "decay"},
             description="information alignment: R = -alpha <r, s> + beta ||r B||^2 + gamma "
                         "(||W||^2 + ||B||^2) makes B a ridge decoder of the input from the output "
                         "(Kunin et al. 2020)",
             options=_coefficients(alpha=2e-3, beta=1e-3, gamma=1e-3)),
    )
}

RULES: tuple[str, ...] = tuple(_REGISTRY)

# none  - raw B: usf is +-1, random rules draw from the layer's default init distribution
# init  - one gain fixed at conversion so that ||B||_F = ||W||_F at that moment
# match - before every training forward, ||B||_F = ||W||_F
SCALES: tuple[str, ...] = ("none", "init", "match")


# Not mutated (TESTING.md): the tests' parameter lists call it when they are collected.
def get_rule(name: str) -> Rule:  # pragma: no mutate block
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
