"""Kunin et al.'s alignment regularisers (2020, "Two routes to scalable credit assignment without
weight symmetry"): B is a Parameter that learns from the gradient of a regulariser R(B) on the
training batch, through the optimizer that trains W; the task loss gives B nothing.

For a layer with training input x, pre-activation output r = x W^T (conv: conv(x, W), no bias)
and s = x B^T (conv: conv(x, B)), N the batch size and sums over every output position, R is a
weighted sum of these primitives:

    decay  = ||W||^2 + ||B||^2                  dR/dB = 2 B
    self   = -<W, B>                            dR/dB = -W
    sparse = (1/N) sum_n ||r_n||^2 + ||s_n||^2   dR/dB = (2/N) wgrad(s, x)
    amp    = -(1/N) sum_n <r_n, s_n>             dR/dB = -(1/N) wgrad(r, x)
    null   = (1/N) sum_n ||r_n B||^2             dR/dB = (2/N) wgrad(r, u),  u = r B (conv: the
                                                 transposed convolution of r by B)

where wgrad(g, v) = sum over positions of g v^T is the layer's weight gradient for output
gradient g and input v (convolution_backward's, for every convolution torch has). Each rule names
its primitives by its options (rules.py): sa = alpha decay + beta self, aa = alpha sparse + beta
amp, ia = alpha amp + beta null + gamma decay.

The gradient comes from x and r saved for the backward (no second forward through the layer):
terms that share an input are summed before one weight-gradient call, so aa costs one extra
convolution (s) and one weight gradient, ia one transposed convolution (u) and one weight
gradient, sa nothing but elementwise work. The rules' option `examples` lets the data terms read
only the batch's first examples, which cuts aa's and ia's extra work in proportion.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PRIMITIVES = ("decay", "self", "sparse", "amp", "null")
# The primitives that read the layer's data (x, and r = the pre-activation output).
DATA_PRIMITIVES = ("sparse", "amp", "null")

convolution_backward = torch.ops.aten.convolution_backward.default


class Terms(NamedTuple):
    """The coefficient of each primitive in R (0 where the rule does not use it), and how many of
    the batch's examples the data terms read (0: all)."""
    decay: float = 0.0
    self: float = 0.0
    sparse: float = 0.0
    amp: float = 0.0
    null: float = 0.0
    examples: int = 0

    @property
    def reads_data(self) -> bool:
        return any(getattr(self, name) != 0 for name in DATA_PRIMITIVES)

    @property
    def reads_weight(self) -> bool:
        return self.self != 0


def scheduled(primitive_of: dict[str, str], options: dict) -> list[str]:
    """The coefficients whose term of R is on for part of training only: the option NAME_start
    above 0 or NAME_stop below 1 (fractions of training)."""
    return [option for option in primitive_of if options[f"{option}_start"] > 0.0 or options[f"{option}_stop"] < 1.0]


def terms(primitive_of: dict[str, str], options: dict, progress: float | None = None) -> Terms:
    """R's coefficients from a rule's options at `progress` (the fraction of training done; needed
    only for a coefficient on a schedule): `primitive_of` maps option name -> primitive; the
    option `strength` multiplies them all; a coefficient counts from the fraction NAME_start of
    training until NAME_stop (0 outside; a stop of 1 includes the end)."""
    strength = float(options["strength"])
    on_schedule = set(scheduled(primitive_of, options))
    if on_schedule and progress is None:
        raise RuntimeError(f"coefficient {sorted(on_schedule)[0]!r} is on a schedule over training: tell the "
                           "model how far training is with fa.set_progress(model, fraction) before each step")

    def coefficient(option: str) -> float:
        start, stop = options[f"{option}_start"], options[f"{option}_stop"]
        if option in on_schedule and not (start <= progress and (progress < stop or stop == 1.0)):
            return 0.0
        return strength * float(options[option])

    return Terms(**{primitive: coefficient(option) for option, primitive in primitive_of.items()},
                 examples=int(options["examples"]))


def _weight_gradient(grad_output: Tensor, input: Tensor, feedback: Tensor, conv) -> Tensor:
    """sum over positions of grad_output input^T, shaped like the layer's weight."""
    if conv is None:
        return grad_output.reshape(-1, grad_output.shape[-1]).t().mm(input.reshape(-1, input.shape[-1]))
    return convolution_backward(grad_output, input, feedback, None, *conv, [False, True, False])[1]


def _through_feedback(input: Tensor, feedback: Tensor, conv) -> Tensor:
    """s = x B^T (conv: conv(x, B))."""
    if conv is None:
        return F.linear(input, feedback)
    return torch.convolution(input, feedback, None, *conv)


def _back_through_feedback(grad_output: Tensor, input: Tensor, feedback: Tensor, conv) -> Tensor:
    """u = r B (conv: the transposed convolution of r by B, shaped like the input)."""
    if conv is None:
        return grad_output.matmul(feedback)
    return convolution_backward(grad_output, input, feedback, None, *conv, [True, False, False])[0]


def batch_size(input: Tensor, conv) -> int:
    """N: the examples in the batch (a linear layer's 1-d input is one example)."""
    return 1 if conv is None and input.dim() == 1 else input.shape[0]


def feedback_gradient(terms: Terms, feedback: Tensor, weight: Tensor | None, input: Tensor | None,
                      output: Tensor | None, conv) -> Tensor:
    """dR/dB for B = `feedback`, W = `weight`, x = `input`, r = `output` (pre-bias); `conv` the
    convolution's arguments (functions.ConvArgs) or None for a linear map."""
    grad = torch.zeros_like(feedback)
    if terms.decay:
        grad.add_(feedback, alpha=2.0 * terms.decay)
    if terms.self:
        grad.sub_(weight.to(feedback.dtype), alpha=terms.self)
    if not terms.reads_data:
        return grad
    if terms.examples and batch_size(input, conv) > terms.examples:
        # R's data terms on the batch's first examples: a sample of the same average.
        input, output = input[:terms.examples], output[:terms.examples]
    n = batch_size(input, conv)
    if terms.sparse:  # sparse and amp read x: one weight gradient for both
        on_input = _through_feedback(input, feedback, conv).mul_(2.0 * terms.sparse / n)
        if terms.amp:
            on_input.sub_(output, alpha=terms.amp / n)
        grad.add_(_weight_gradient(on_input, input, feedback, conv))
        if terms.null:
            u = _back_through_feedback(output, input, feedback, conv)
            grad.add_(_weight_gradient(output, u, feedback, conv), alpha=2.0 * terms.null / n)
        return grad
    # amp and null share r as the output gradient: one weight gradient of r for both inputs.
    combined = input.mul(-terms.amp / n) if terms.amp else torch.zeros_like(input)
    if terms.null:
        combined.add_(_back_through_feedback(output, input, feedback, conv), alpha=2.0 * terms.null / n)
    return grad.add_(_weight_gradient(output, combined, feedback, conv))
