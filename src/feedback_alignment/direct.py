"""Direct feedback alignment (Nokland 2016): the output error sent straight to every layer.

Each converted layer's input gradient is e @ B_l, where e = dL/d(scores) is the error at the
model's output and B_l (classes x the layer's input size) is the layer's own fixed random matrix:
every channel and position gets its own feedback. Between layers the signal passes back through
the nonlinearities (their derivatives gate it) to the previous layer's output, whose weight
gradient is then the true one for that signal. The true input gradient (W^T times the error) is
never computed.

The error reaches the layers through hooks on the converted model (`convert` installs them): a
forward pre-hook opens a fresh OutputError, the layers of that forward keep it, and a gradient
hook on the model's output fills it at the start of the backward, before any layer's backward.
So the training loop stays the plain one: `loss_fn(model(x), y).backward()`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class DirectFeedbackFunction(torch.autograd.Function):
    """DFA: the forward of a conv or linear layer; in the backward, true weight and bias
    gradients from the arriving grad_output, and as the input gradient the model's output error
    times this layer's B (classes x input size), not the true one, which is never computed.
    `pad` (F.pad's arguments, or None) is applied inside, so that B and the error it sends are
    sized for the layer's own input whatever its padding mode."""

    @staticmethod
    def forward(ctx, input, weight, bias, feedback, error, layer_name, conv, pad):
        ctx.save_for_backward(input)
        # W only gives the weight gradient its shape: kept as an attribute, so that a weight-norm
        # constraint rescaling it in place before the backward trips no version check.
        ctx.weight, ctx.feedback, ctx.error, ctx.layer_name = weight, feedback, error, layer_name
        ctx.conv, ctx.pad = conv, pad
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        if conv is None:
            return F.linear(input, weight, bias)
        return torch.convolution(F.pad(input, *pad) if pad else input, weight, bias, *conv)

    @staticmethod
    def backward(ctx, grad_output):
        input, = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if ctx.conv is None:
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            if need_weight:
                grad_weight = flat_grad.t().mm(input.reshape(-1, input.shape[-1]))
            if need_bias and ctx.bias_sizes is not None:
                grad_bias = flat_grad.sum(0)
        elif need_weight or need_bias:
            conv = ctx.conv
            padded = F.pad(input, *ctx.pad) if ctx.pad else input
            # No input gradient asked for: W only gives the weight gradient its shape.
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, padded, ctx.weight.detach(), ctx.bias_sizes, conv.stride, conv.padding,
                conv.dilation, conv.transposed, conv.output_padding, conv.groups,
                [False, need_weight, need_bias and ctx.bias_sizes is not None])
        if need_input:
            error = ctx.error.value
            if error is None:
                raise RuntimeError(f"dfa layer {ctx.layer_name!r} has no output error to project: "
                                   "the loss must be computed from the model's output (the class scores)")
            feedback = ctx.feedback
            grad_input = error.to(feedback.dtype).mm(feedback).view(input.shape).to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class OutputError:
    """The error at the model's output (dL/d scores) of one forward, for the dfa layers."""

    def __init__(self):
        self.value = None

    def store(self, grad: Tensor) -> None:
        self.value = grad.detach().reshape(grad.shape[0], -1)


class DirectFeedbackSource:
    """Hooks on the converted model: each forward opens a fresh OutputError that the dfa layers
    of that forward keep, and the output's gradient hook fills it at the start of the backward
    (before any layer's backward runs). Several forwards before one backward stay apart."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.current = OutputError()
        # Set by alignment.measure while its backprop pass runs the layers as plain ones.
        self.exact = False

    def begin(self, module, args) -> None:
        self.current = OutputError()

    def attach(self, module, args, output) -> None:
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        if output.dim() != 2 or output.shape[1] != self.num_classes:
            raise ValueError(f"dfa needs the model's output to be class scores (batch x "
                             f"{self.num_classes}), got shape {tuple(output.shape)}")
        if not (torch.compiler.is_compiling() or self.exact or _made_by_dfa_layer(output)):
            # dL/d(log p) after a LogSoftmax, or the error of anything computed after the
            # classifier, is not the output error that dfa sends to every layer.
            made_by = type(output.grad_fn).__name__ if output.grad_fn is not None else "no operation"
            raise ValueError(f"dfa needs the model to return its last layer's output (the logits), but "
                             f"this model's output is made by {made_by}: return the logits and apply "
                             "softmax or log-softmax in the loss")
        output.register_hook(self.current.store)


def _made_by_dfa_layer(output: Tensor) -> bool:
    return isinstance(output.grad_fn, DirectFeedbackFunction._backward_cls)
