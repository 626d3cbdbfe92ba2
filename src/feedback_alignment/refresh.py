"""The per-step refresh of feedback layers, many at once.

Before a training forward every layer's B is brought up to date: the weight-norm constraint, the
signs of the current W (usf, frsf), a fresh draw (brsf), the matched gain. Done layer by layer
that is a Python loop of small kernels, 140-320 launches per ResNet-20 step on a GPU, each
waiting on the host. Here the layers of a model that share rule, scale, constraint, device and
dtype (`group_key`) are refreshed together in a fixed number of multi-tensor operations
(torch._foreach_*, one draw for all of them), however many layers there are; a single layer is
a group of one, so one code path serves both. Nothing reads a value back to the host: on a GPU
the refresh only queues work.

On a CPU the fused kernel (native.py) still takes the sign-concordant rules layer by layer: one
pass per layer over W and B beats a dozen multi-tensor passes, and a CPU has no launches to save.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import draws, native
from .native import SquaredNorms

_PLANS: dict[tuple, draws.StreamPlan] = {}
_PLANS_KEPT = 64  # a handful per model (one per group and device); old ones are dropped first


def group_key(layer, weight: Tensor) -> tuple:
    """Layers with the same key are refreshed together."""
    return (layer.rule.name, layer.scale, layer.constrain_weight_norm, weight.device, weight.dtype)


def stream_plan(sizes: tuple[int, ...], device: torch.device) -> draws.StreamPlan:
    key = (sizes, device)
    plan = _PLANS.pop(key, None) or draws.StreamPlan(list(sizes), device)
    _PLANS[key] = plan  # most recently used last
    while len(_PLANS) > _PLANS_KEPT:
        del _PLANS[next(iter(_PLANS))]
    return plan


class LayerDraws:
    """The next draw of each layer's stream (draws.py), for a rule's write_feedback. Per-step
    draws (per_step) take the 16-bit levels, draws made once full precision."""

    def __init__(self, layers: list, per_step: bool):
        self.layers = layers
        self.per_step = per_step

    def uniform_(self, tensors: list[Tensor], lows: list[float], highs: list[float]) -> None:
        for layer, tensor, low, high in zip(self.layers, tensors, lows, highs):
            layer._draw_uniform(tensor, low, high, per_step=self.per_step)

    def uniform_times_sign_(self, tensors: list[Tensor], highs: list[float],
                            signs_of: list[Tensor]) -> list[SquaredNorms] | None:
        """Each tensor := U(0, high) * sign(sign_of); the squared norms where the fused kernel
        summed them, else None. Per-step magnitudes are the levels (2k + 1) high / 2^17."""
        if not self.per_step:
            for layer, tensor, high, sign_of in zip(self.layers, tensors, highs, signs_of):
                layer._draw_uniform(tensor, 0.0, high, per_step=False).mul_(torch.sign(sign_of))
            return None
        steps = [high / (1 << (draws.FAST_BITS + 1)) for high in highs]
        if all(native.takes(tensor, sign_of) for tensor, sign_of in zip(tensors, signs_of)):
            keys = next_host_keys(self.layers)
            return [native.signed_feedback_(tensor, sign_of, key=key, step=step)
                    for tensor, sign_of, key, step in zip(tensors, signs_of, keys, steps)]
        keys = next_device_keys(self.layers)
        if len(tensors) == 1:  # no plan needed (and none to look up under torch.compile)
            magnitudes = [draws.levels_of_keys(keys, tensors[0].numel(), tensors[0].dtype)]
        else:
            plan = stream_plan(tuple(tensor.numel() for tensor in tensors), tensors[0].device)
            magnitudes = plan.levels(keys, tensors[0].dtype)
        torch._foreach_mul_(magnitudes, 2.0)
        torch._foreach_add_(magnitudes, 1.0)
        torch._foreach_mul_(magnitudes, steps)
        # Levels follow the logical order of entries, whatever B's memory format.
        shaped = [magnitude.view(tensor.shape) for magnitude, tensor in zip(magnitudes, tensors)]
        torch._foreach_copy_(tensors, signs_of)
        torch._foreach_sign_(tensors)
        torch._foreach_mul_(tensors, shaped)
        return None

def next_host_keys(layers: list) -> list[int]:
    """The keys of the layers' next draws, from the counters' host copies; advances every counter."""
    keys = [draws.draw_key(layer.stream_key, layer.host_draw_count()) for layer in layers]
    _advance(layers)
    return keys


def next_device_keys(layers: list) -> Tensor:
    """The keys of the layers' next draws, computed where the counters are (no host read);
    advances them."""
    keys = draws.draw_keys(torch.stack([layer.feedback_stream_key for layer in layers]),
                           torch.stack([layer.feedback_draws for layer in layers]))
    _advance(layers)
    return keys


def _advance(layers: list) -> None:
    compiling = torch.compiler.is_compiling()
    for layer in layers:
        # A compiled graph cannot keep a host count (it would be a constant of the graph): the
        # buffer alone advances there, and the host count is read back when next needed.
        layer._draw_count = None if compiling else layer.host_draw_count() + 1
    torch._foreach_add_([layer.feedback_draws for layer in layers], 1)


@torch.no_grad()
def refresh_layers_(layers: list, weights: list[Tensor]) -> None:
    """Bring B up to date for a forward of each layer with its weight in `weights`: weight-norm
    constraint, signs of the current W, a fresh draw (brsf), the feedback scale. The layers share
    one `group_key`."""
    first = layers[0]
    for layer, weight in zip(layers, weights):
        layer._draws_if_materialized(weight)
    if first.constrain_weight_norm:
        targets = torch.stack([layer.weight_norm_target for layer in layers])
        torch._foreach_mul_(weights, (targets / torch.stack(torch._foreach_norm(weights))).unbind())
    rule = first.rule
    if rule.write_feedback is not None:
        rewrites = not rule.fixed_direction
        match = first.scale == "match"
        for layer in layers:
            layer._copy_for_pending_backward(direction=rewrites, gain=match)
        norms = write_feedback(layers, weights) if rewrites else None
        if match:
            gains = [layer.feedback_gain for layer in layers]
            torch._foreach_copy_(gains, norm_ratios(layers, weights, norms).to(gains[0].dtype).unbind())
    compiling = torch.compiler.is_compiling()  # a graph keeps no tensor versions
    for layer, weight in zip(layers, weights):
        layer._fresh_for = None if compiling else layer._weight_versions(weight)


def write_feedback(layers: list, weights: list[Tensor]) -> list[SquaredNorms] | None:
    """The rule's raw B for every layer (they share the rule), from its next draw."""
    rule = layers[0].rule
    magnitudes = [layer.feedback_magnitude for layer in layers] if rule.keeps_magnitude else None
    return rule.write_feedback([weight.detach() for weight in weights],
                               [layer.feedback_direction for layer in layers],
                               LayerDraws(layers, per_step=rule.randomness == "every_step"),
                               [layer.init_bound for layer in layers], magnitudes)


def norm_ratios(layers: list, weights: list[Tensor], norms: list[SquaredNorms] | None = None) -> Tensor:
    """||W|| / ||direction|| per layer, from `norms` where the kernel that wrote B summed them.
    The direction is 0 only where W = 0 everywhere; the clamp keeps B = 0 there, not NaN."""
    direction = layers[0].feedback_direction
    tiny = torch.finfo(direction.dtype).tiny
    if norms is not None:
        return torch.tensor([norm.weight ** 0.5 / max(norm.feedback ** 0.5, tiny) for norm in norms],
                            dtype=torch.float64)
    weight_norms = torch.stack(torch._foreach_norm(weights))
    if layers[0].rule.fixed_direction:
        direction_norms = torch.stack([layer.feedback_direction_norm for layer in layers])
    else:
        direction_norms = torch.stack(torch._foreach_norm([layer.feedback_direction for layer in layers]))
    return weight_norms / direction_norms.clamp_min(tiny)
