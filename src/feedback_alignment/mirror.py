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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .convert import feedback_layers

MIRROR_POSITIONS = 8  # output positions per side of a conv noise image: 64 samples per image


def mirror_layers(model: nn.Module) -> list:
    return [layer for _, layer in feedback_layers(model) if layer.rule.learning == "mirror"]


@torch.no_grad()
def mirror_step(model: nn.Module, lr: float = 0.05, decay: float = 0.05, batch_size: int = 16,
                budget: float = 0.0) -> int:
    """One mirror phase for every wm layer of `model`; returns how many layers it updated.
    `budget` > 0 bounds its work by that fraction of the training step's (noise_images)."""
    layers = mirror_layers(model)
    for layer, images in zip(layers, noise_images(layers, batch_size, budget)):
        estimate = _weight_estimate(layer, images)
        layer._detach_pending_backward_from_feedback()  # a forward not yet backpropagated keeps its B
        layer.feedback_direction.mul_(1.0 - decay).add_(estimate, alpha=lr)
    return len(layers)


def _samples_per_image(layer) -> int:
    """Noise samples (positions the layer applies W at) per noise image."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return MIRROR_POSITIONS ** len(layer.kernel_size)
    return MIRROR_POSITIONS ** 2  # a linear layer gets as many vectors as a 2-d conv positions


def noise_images(layers: list, batch_size: int, budget: float) -> list[int]:
    """Noise images for each layer in this mirror phase: `batch_size`, or fewer where the phase's
    multiply-adds would exceed `budget` times the training step's over all the wm layers: then the
    cheap layers keep `batch_size` and the costly ones share the rest equally (water-filling), at
    least one image each.

    A layer's multiply-adds are its weight's size times, in the mirror phase, 2 x its noise
    samples (the response y and the estimate), in training 3 x the positions of its latest
    forward (output, input gradient, weight gradient), all processes' if data-parallel, so that
    the counts, and the noise, are the same for any number of processes. Where layers see few
    positions per step (resnet18 on 32x32 images: 128 in layer4), fewer images make their B
    noisier. A budget of 0 (or layers that have not run a forward yet) leaves `batch_size`."""
    if budget <= 0 or any(layer.forward_positions is None for layer in layers):
        return [batch_size] * len(layers)
    processes = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    training = 3 * processes * sum(layer.forward_positions * layer.weight.numel() for layer in layers)
    per_image = [2 * _samples_per_image(layer) * layer.weight.numel() for layer in layers]
    left, cap = budget * training, float("inf")
    for done, cost in enumerate(sorted(batch_size * c for c in per_image)):
        share = left / (len(layers) - done)
        if cost > share:  # this and every costlier layer get `share`
            cap = share
            break
        left -= cost
    return [max(1, int(min(batch_size, cap / c))) for c in per_image]


UNIT_VARIANCE_BOUND = 3 ** 0.5  # U(-sqrt 3, sqrt 3) has variance 1


def _noise(layer, shape) -> torch.Tensor:
    """The layer's next noise draw, from its own seeded stream (and draw counter)."""
    noise = torch.empty(shape, device=layer.weight.device, dtype=torch.float32)
    return layer._draw_uniform(noise, -UNIT_VARIANCE_BOUND, UNIT_VARIANCE_BOUND, per_step=True)


def _weight_estimate(layer, batch_size: int) -> torch.Tensor:
    """W_hat = y x^T / samples from `batch_size` noise images (or 64 x as many noise vectors)."""
    weight = layer.weight.detach().float()
    samples = batch_size * _samples_per_image(layer)
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
    else:
        x = _noise(layer, (samples, weight.shape[1]))
        estimate = F.linear(x, weight).t().mm(x)
    return (estimate / samples).to(layer.feedback_direction.dtype)
