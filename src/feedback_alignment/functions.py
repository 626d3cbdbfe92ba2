"""The autograd Functions of the layer-to-layer rules: the plain layer's forward, and a backward
that sends the error through B instead of W.

Forward, weight gradient and bias gradient are exactly those of the plain convolution or linear
map; only the input gradient uses B. The weight gradient of a convolution depends on the weight's
shape alone, so one `convolution_backward` call given B in W's place yields all three gradients at
the cost of plain backprop, for every convolution torch has (1-, 2- and 3-d, transposed or not).

B and its gain are kept on the autograd node as attributes, not as saved tensors: the layer
hands each forward the B of that forward and never overwrites a B that a pending backward still
holds (layers.py copies it for that backward first). Saved tensors would be re-saved from the
layer's current B when activation checkpointing recomputes a forward; attributes stay those of
the forward that built the node.

Both Functions are written in the `setup_context` style, with vmap rules generated from their
backward, so `torch.func.grad` and `torch.func.vmap` go through them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import regularizers

# The overload itself: calling the packet resolves it anew on every call.
convolution_backward = torch.ops.aten.convolution_backward.default


class ConvArgs(NamedTuple):
    """The arguments of `torch.convolution` besides input, weight and bias."""
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    transposed: bool
    output_padding: list[int]
    groups: int


def apply_gain(feedback: Tensor, gain: Tensor | None, grad_input_numel: int):
    """(B, factor for the input gradient): B = direction * gain is linear in the gain, so scale
    whichever is smaller, the direction or the input gradient. No gain (scale "none"): B as is."""
    if gain is None:
        return feedback, None
    if gain.dtype != feedback.dtype:
        gain = gain.to(feedback.dtype)
    if feedback.numel() <= grad_input_numel:
        return feedback * gain, None
    return feedback, gain


# In both Functions, `direction` needs a gradient only where B is learned by the optimizer: under
# Kolen-Pollack it is the weight's gradient (computed once, handed to both); under an alignment
# regulariser (`terms`, regularizers.py) it is dR/dB, from the input and the pre-bias output
# saved here. `gain` is None where it is 1 for good.


def _save(ctx, input, weight, bias, output, terms, bias_shape) -> None:
    """Save the input, and what the regulariser reads: W (an attribute, as B is: W as it is at
    the backward, so that W may change between a forward and its backward, as it may for every
    other rule) and r = the output before its bias (the output itself when there is no bias; it
    is then version-checked like any saved output)."""
    ctx.terms = terms
    ctx.weight = weight.detach() if terms is not None and terms.reads_weight else None
    pre_bias = None
    if terms is not None and terms.reads_data:
        pre_bias = output if bias is None else output.detach() - bias.detach().view(bias_shape)
    ctx.save_for_backward(input, pre_bias)


def _direction_gradient(ctx, need_direction, grad_weight, input, pre_bias, conv):
    if not need_direction:
        return None
    if ctx.terms is None:
        return grad_weight
    return regularizers.feedback_gradient(ctx.terms, ctx.feedback.detach(), ctx.weight, input, pre_bias, conv)


class FeedbackConvFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, direction, gain, conv: ConvArgs, terms=None):
        return torch.convolution(input, weight, bias, *conv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, direction, gain, conv, terms = inputs
        _save(ctx, input, weight, bias, output, terms, (1, -1) + (1,) * (output.dim() - 2))
        ctx.feedback, ctx.gain, ctx.conv = direction, gain, conv
        ctx.bias_sizes = None if bias is None else list(bias.shape)

    @staticmethod
    def backward(ctx, grad_output):
        input, pre_bias = ctx.saved_tensors
        need_input, need_weight, need_bias, need_direction = ctx.needs_input_grad[:4]
        feedback, input_factor = apply_gain(ctx.feedback.detach(), ctx.gain, input.numel() if need_input else 0)
        conv = ctx.conv
        weight_gradient_for_direction = need_direction and ctx.terms is None
        grad_input, grad_weight, grad_bias = convolution_backward(
            grad_output, input, feedback, ctx.bias_sizes, conv.stride, conv.padding, conv.dilation,
            conv.transposed, conv.output_padding, conv.groups,
            [need_input, need_weight or weight_gradient_for_direction, need_bias and ctx.bias_sizes is not None],
        )
        if grad_input is not None and input_factor is not None:
            grad_input = grad_input.mul_(input_factor)
        grad_direction = _direction_gradient(ctx, need_direction, grad_weight, input, pre_bias, conv)
        return grad_input, grad_weight if need_weight else None, grad_bias, grad_direction, None, None, None


class FeedbackLinearFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, direction, gain, terms=None):
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, direction, gain, terms = inputs
        _save(ctx, input, weight, bias, output, terms, (-1,))
        ctx.feedback, ctx.gain = direction, gain
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output):
        input, pre_bias = ctx.saved_tensors
        need_input, need_weight, need_bias, need_direction = ctx.needs_input_grad[:4]
        grad_input = grad_weight = grad_bias = None
        if need_input:
            feedback, input_factor = apply_gain(ctx.feedback.detach(), ctx.gain, input.numel())
            grad_input = grad_output.matmul(feedback)
            if input_factor is not None:
                grad_input = grad_input.mul_(input_factor)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        if need_weight or (need_direction and ctx.terms is None):
            grad_weight = flat_grad.t().mm(input.reshape(-1, input.shape[-1]))
        if need_bias and ctx.has_bias:
            grad_bias = flat_grad.sum(0)
        grad_direction = _direction_gradient(ctx, need_direction, grad_weight, input, pre_bias, None)
        return grad_input, grad_weight if need_weight else None, grad_bias, grad_direction, None, None


def saved_tensors_alive(node) -> bool:
    """Whether the autograd node of one of these Functions can still run its backward: False once
    a backward without retain_graph has freed what it saved."""
    try:
        node._raw_saved_tensors
    except RuntimeError:
        return False
    return True
