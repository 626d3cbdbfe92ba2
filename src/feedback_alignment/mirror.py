"""Weight mirrors (Akrout et al. 2019): B learns W from noise sent through the layer.

    fa.convert(model, rule="wm", seed=0)
    ... after each optimizer step:
    fa.mirror.mirror_step(model)

In a mirror phase between training steps every wm layer takes white noise x at its input
(zero mean, unit variance; uniform, which a CPU draws far faster than Gaussian noise) and observes its own linear response y = W x (no bias, no padding). For white noise
E[y x^T] = W, so W_hat = y x^T / n over n noise vectors (for a convolution: every output
position of every noise image) is an unbiased estimate, and

    B <- (1 - decay) B + lr W_hat

has the fixed point (lr / decay) W in expectation: with lr = decay (the default) B tracks W, as
an average of recent estimates. The layer sees only its own input and output, never W itself.
The noise comes from the layer's own seeded stream (seed, layer name, draw index), so resumed
and data-parallel runs draw the same noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convert import feedback_layers

MIRROR_POSITIONS = 8  # output positions per side of a conv noise image: 64 samples per image


def mirror_layers(model: nn.Module) -> list:
    return [layer for _, layer in feedback_layers(model) if layer.rule.learning == "mirror"]


@torch.no_grad()
def mirror_step(model: nn.Module, lr: float = 0.05, decay: float = 0.05, batch_size: int = 16) -> int:
    """One mirror phase for every wm layer of `model`; returns how many layers it updated."""
    layers = mirror_layers(model)
    for layer in layers:
        estimate = _weight_estimate(layer, batch_size)
        layer._detach_pending_backward_from_feedback()  # a forward not yet backpropagated keeps its B
        layer.feedback_direction.mul_(1.0 - decay).add_(estimate, alpha=lr)
    return len(layers)


UNIT_VARIANCE_BOUND = 3 ** 0.5  # U(-sqrt 3, sqrt 3) has variance 1


def _noise(layer, shape) -> torch.Tensor:
    """The layer's next noise draw, from its own seeded stream (and draw counter)."""
    noise = torch.empty(shape, device=layer.weight.device, dtype=torch.float32)
    return layer._draw_uniform(noise, -UNIT_VARIANCE_BOUND, UNIT_VARIANCE_BOUND, per_step=True)


def _weight_estimate(layer, batch_size: int) -> torch.Tensor:
    weight = layer.weight.detach().float()
    if isinstance(layer, nn.modules.conv._ConvNd):
        # sum over images and positions of y x_patch^T: the weight gradient of y w.r.t. W, for a
        # convolution or a transposed one alike, from noise x and the response y (no padding).
        stride, dilation = list(layer.stride), list(layer.dilation)
        spatial = len(layer.kernel_size)
        if layer.transposed:  # every input position meets every weight once
            side = [MIRROR_POSITIONS] * spatial
        else:  # every output position does
            side = [d * (k - 1) + 1 + s * (MIRROR_POSITIONS - 1)
                    for k, s, d in zip(layer.kernel_size, stride, dilation)]
        x = _noise(layer, (batch_size, layer.in_channels, *side))
        conv = (stride, [0] * spatial, dilation, layer.transposed, [0] * spatial, layer.groups)
        y = torch.convolution(x, weight, None, *conv)
        _, estimate, _ = torch.ops.aten.convolution_backward(y, x, weight, None, *conv, [False, True, False])
        samples = batch_size * MIRROR_POSITIONS ** spatial
    else:
        # As many noise vectors as a 2-d conv layer gets output positions: the same estimate quality.
        samples = batch_size * MIRROR_POSITIONS ** 2
        x = _noise(layer, (samples, weight.shape[1]))
        estimate = F.linear(x, weight).t().mm(x)
    return (estimate / samples).to(layer.feedback_direction.dtype)
