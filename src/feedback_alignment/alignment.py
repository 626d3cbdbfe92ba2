"""How well a rule's learning signals align with backprop's, per layer, on one batch.

    frame = fa.alignment.measure(model, inputs, targets, loss_fn)

One row per converted layer, in forward order:
- angle_feedback_weight : degrees between B and W (0: B is W up to scale; 90: unrelated)
- norm_ratio            : ||B|| / ||W||
- angle_update          : degrees between the rule's weight gradient and backprop's, same batch
- angle_signal          : degrees between the error the rule sends into the layer's input and
                          the true input gradient (NaN for a layer whose input needs no gradient)
- grad_norm, grad_norm_bp : ||dL/dW|| under the rule and under backprop

The model is left exactly as it was: parameters and their .grad, buffers (BatchNorm running
statistics, feedback magnitudes, draw counters), train/eval mode and the global random streams.
Both passes see the same B (the one the latest training step used) and the same dropout masks.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .layers import FeedbackLayer

if TYPE_CHECKING:  # imported where used: this package's import (every Snakemake start) skips pandas
    import pandas as pd


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """The angle between two tensors seen as vectors (NaN if either is zero)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    denominator = a.norm() * b.norm()
    if denominator == 0:
        return math.nan
    return math.degrees(math.acos(float((a @ b / denominator).clamp(-1.0, 1.0))))


@contextlib.contextmanager
def _untouched(model: nn.Module, devices):
    """Restore parameters' .grad, every buffer (the tensor objects and their values, so that a B
    drawn during the block, as dfa draws at its first forward, is undrawn), the layers' draw
    bookkeeping, train/eval mode and the random streams when the block ends."""
    grads = {p: p.grad for p in model.parameters()}
    buffers = {m: dict(m._buffers) for m in model.modules()}
    values = [(b, b.detach().clone()) for m in buffers for b in m._buffers.values() if b is not None]
    layers = {m: (m._fresh_for, m._refreshed_ahead, m._awaiting_first_draw, list(m._pending_backward), m.host_draw_count())
              for m in model.modules() if isinstance(m, FeedbackLayer)}
    sources = {id(s): (s, s.current) for m in layers if (s := getattr(m, "direct_source", None)) is not None}
    cpu_rng = torch.get_rng_state()
    cuda_rng = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    training = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for parameter, grad in grads.items():
            parameter.grad = grad
        for module, saved in buffers.items():
            module._buffers.clear()
            module._buffers.update(saved)
        with torch.no_grad():
            for buffer, saved in values:
                buffer.copy_(saved)
        for layer, (fresh_for, ahead, awaiting, pending, draw_count) in layers.items():
            layer._fresh_for, layer._refreshed_ahead, layer._awaiting_first_draw = fresh_for, ahead, awaiting
            layer._draw_count = draw_count
            layer._pending_backward[:] = pending
        for source, current in sources.values():
            source.current = current
        torch.set_rng_state(cpu_rng)
        for device, state in cuda_rng.items():
            torch.cuda.set_rng_state(state, device)
        for module, mode in training.items():
            module.training = mode


def _pass(model, layers, inputs, targets, loss_fn, exact: bool):
    """One forward/backward; returns per-layer (weight grad, grad w.r.t. the layer's input)."""
    input_grads: dict[str, Tensor] = {}
    handles = []

    def capture(name):
        def hook(module, args):
            tensor = args[0]
            if not tensor.requires_grad:
                return None
            # A view of its own: its gradient is what this layer sends back, not the sum over
            # every consumer of the tensor (a ResNet block's input feeds two convolutions).
            tensor = tensor.view_as(tensor)
            tensor.register_hook(lambda grad: input_grads.__setitem__(name, grad.detach().clone()))
            return (tensor, *args[1:])
        return hook

    sources = {id(s): s for _, layer in layers if (s := getattr(layer, "direct_source", None)) is not None}
    for source in sources.values():
        source.exact = exact  # dfa's output check: the backprop pass runs the classifier plain
    for name, layer in layers:
        layer._exact_backprop = exact
        handles.append(layer.register_forward_pre_hook(capture(name)))
    try:
        for parameter in model.parameters():
            parameter.grad = None
        # The input needs a gradient too, so that the first layer's signal can be compared.
        loss_fn(model(inputs.detach().requires_grad_(inputs.is_floating_point())), targets).backward()
    finally:
        for handle in handles:
            handle.remove()
        for _, layer in layers:
            layer._exact_backprop = False
        for source in sources.values():
            source.exact = False
    return {name: (layer.weight.grad.detach().clone(), input_grads.get(name)) for name, layer in layers}


def measure(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn=nn.functional.cross_entropy,
            train_mode: bool = True) -> pd.DataFrame:
    """Per-layer alignment of the rule with backprop on one batch; see the module docstring."""
    order: list[str] = []
    named = {name: m for name, m in model.named_modules() if isinstance(m, FeedbackLayer)}
    if not named:
        raise ValueError("measure needs a converted model (fa.convert); this one has no feedback layers")
    devices = {p.device for p in model.parameters()}
    with _untouched(model, devices):
        model.train(train_mode)
        rng = torch.get_rng_state()
        cuda_rng = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
        # Forward order, from a hook on the first pass.
        hooks = [m.register_forward_pre_hook(lambda m, a, n=name: order.append(n) if n not in order else None)
                 for name, m in named.items()]
        for layer in named.values():
            layer._feedback_frozen = True
        try:
            rule = _pass(model, list(named.items()), inputs, targets, loss_fn, exact=False)
            torch.set_rng_state(rng)  # same dropout masks in the backprop pass
            for device, state in cuda_rng.items():
                torch.cuda.set_rng_state(state, device)
            exact = _pass(model, list(named.items()), inputs, targets, loss_fn, exact=True)
        finally:
            for hook in hooks:
                hook.remove()
            for layer in named.values():
                layer._feedback_frozen = False
    rows = []
    for name in order + [n for n in named if n not in order]:
        layer = named[name]
        feedback, weight = layer.feedback_weight.detach(), layer.weight.detach()
        (grad, signal), (grad_bp, signal_bp) = rule[name], exact[name]
        # dfa's B maps the output error (classes x input size): comparable with W only where
        # it has W's shape, at the classifier.
        comparable = feedback.shape == weight.shape
        rows.append(dict(
            layer=name, rule=layer.rule.name,
            angle_feedback_weight=angle_degrees(feedback, weight) if comparable else math.nan,
            norm_ratio=float(feedback.double().norm() / weight.double().norm()) if comparable else math.nan,
            angle_update=angle_degrees(grad, grad_bp),
            angle_signal=angle_degrees(signal, signal_bp) if signal is not None and signal_bp is not None
            else math.nan,
            grad_norm=float(grad.double().norm()), grad_norm_bp=float(grad_bp.double().norm())))
    import pandas as pd

    return pd.DataFrame(rows)
