"""Random draws for feedback weights: one definition of every stream, the same on every device.

A layer's stream is keyed by its seed and name (`layer_key`). Its draw number d is SplitMix64
(Steele, Lea & Flood 2014) seeded with the d-th output of SplitMix64 seeded with the layer's key:

    draw_key(layer, d) = mix64(layer_key + (d + 1) * GAMMA)
    word i of the draw  = mix64(draw_key + (i + 1) * GAMMA)        (mod 2^64)

Every word is a function of (seed, layer name, draw index, position) alone. So the same seed
gives the same B whatever else consumed random numbers; a resumed run continues the stream from
the draw counter; DDP ranks agree without communicating; the values depend neither on the number
of threads nor on the device: torch's int64 operations compute the same words on a CPU and on
CUDA, the fused CPU kernel (native.py) computes them in C, and the tests hold all three to a
reference written from the published algorithm. Nothing here uses torch's or numpy's generators.

How words become values:
- per-step draws (brsf's magnitudes, wm's noise) read a word as four 16-bit levels k, lowest
  bits first, and take low + (k + 1/2) (high - low) / 2^16: 65536 levels of U(low, high) are
  far finer than any effect of the magnitude distribution, and four values per word keep the
  draw cheap;
- draws made once (fa's B, frsf's magnitudes) take one word per value at full precision: its top
  24 bits for float32 (53 for float64), low + u (high - low) with u uniform on [0, 1).
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from . import native

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 over the golden ratio, odd
MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
MASK64 = (1 << 64) - 1
FAST_BITS = 16
# Entries per piece of a full-precision draw: bounds its temporary words (8 bytes per entry);
# the values do not depend on it (every word is a function of its position).
PIECE = 1 << 22

# -- the stream's definition, on the host ---------------------------------------------------

def layer_key(seed: int, layer_name: str) -> int:
    """The 64-bit key of a layer's stream, from its seed and name alone."""
    digest = hashlib.sha256(f"{seed}\0{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def mix64(x: int) -> int:
    """SplitMix64's output function on an unsigned 64-bit integer."""
    x = ((x ^ (x >> 30)) * MIX[0]) & MASK64
    x = ((x ^ (x >> 27)) * MIX[1]) & MASK64
    return x ^ (x >> 31)


def draw_key(key: int, draw: int) -> int:
    """The key of draw number `draw` of the stream keyed `key`."""
    return mix64((key + (draw + 1) * GAMMA) & MASK64)


def as_int64(value: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


# -- the same in torch int64 operations (any device) -----------------------------------------

def _shift_right_(x: Tensor, bits: int, scratch: Tensor) -> Tensor:
    """x >> bits as an unsigned shift (torch shifts int64 arithmetically), into `scratch`."""
    torch.bitwise_right_shift(x, bits, out=scratch)
    return scratch.bitwise_and_((1 << (64 - bits)) - 1)


def mix64_(x: Tensor) -> Tensor:
    """mix64 in place on an int64 tensor (multiplication wraps modulo 2^64 on every device)."""
    scratch = torch.empty_like(x)
    x.bitwise_xor_(_shift_right_(x, 30, scratch)).mul_(as_int64(MIX[0]))
    x.bitwise_xor_(_shift_right_(x, 27, scratch)).mul_(as_int64(MIX[1]))
    return x.bitwise_xor_(_shift_right_(x, 31, scratch))


def draw_keys(layer_keys: Tensor, draws: Tensor) -> Tensor:
    """draw_key for int64 tensors of keys and draw indices, computed where they are (no host
    value needed: on a GPU the draw index never leaves the device)."""
    return mix64_((draws + 1) * as_int64(GAMMA) + layer_keys)


def torch_words(key: int | Tensor, count: int, device: torch.device, first: int = 0) -> Tensor:
    """Words first, ..., first + count - 1 of the draw keyed `key`, in torch operations; `key` may
    be a one-entry int64 tensor on `device` (a key computed there)."""
    counters = torch.arange(first + 1, first + count + 1, dtype=torch.int64, device=device)
    return mix64_(counters.mul_(as_int64(GAMMA)).add_(key if isinstance(key, Tensor) else as_int64(key)))


def words(key: int, count: int, device: torch.device, first: int = 0) -> Tensor:
    """Words first, ..., first + count - 1 of the draw keyed `key` (int64 with the words' bits):
    by the fused kernel on a CPU where it is built, else in torch operations."""
    device = torch.device(device)
    if device.type == "cpu" and count > 0 and native.library() is not None:
        out = torch.empty(count, dtype=torch.int64)
        native.random_words_(out, key, first)
        return out
    return torch_words(key, count, device, first)


# -- values from words -----------------------------------------------------------------------

def _in_logical_order(fill_, tensor: Tensor, *args) -> Tensor | None:
    """Draws follow the logical (row-major) order of entries, so that a channels_last buffer gets
    the same values as a contiguous one: fill a contiguous copy and copy it over."""
    if tensor.is_contiguous():
        return None
    return tensor.copy_(fill_(torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device), *args))


def unit_uniform(word_values: Tensor, dtype: torch.dtype) -> Tensor:
    """u uniform on [0, 1) from each word's top bits: 53 for float64, else 24 (exact in float32)."""
    bits = 53 if dtype == torch.float64 else 24
    top = torch.bitwise_right_shift(word_values, 64 - bits).bitwise_and_((1 << bits) - 1)
    return top.to(torch.float64 if bits == 53 else torch.float32).mul_(2.0 ** -bits)


def uniform_(tensor: Tensor, low: float, high: float, key: int) -> Tensor:
    """Fill `tensor` with U(low, high) at full precision, one word per entry of the draw `key`."""
    if (done := _in_logical_order(uniform_, tensor, low, high, key)) is not None:
        return done
    flat = tensor.view(-1)
    for first in range(0, flat.numel(), PIECE):
        piece = flat[first:first + PIECE]
        values = unit_uniform(words(key, piece.numel(), tensor.device, first), tensor.dtype)
        piece.copy_(values.mul_(high - low).add_(low))
    return tensor


def levels_(tensor: Tensor, key: int) -> Tensor:
    """Fill the contiguous `tensor` with the 16-bit levels k of the draw `key` (four per word,
    lowest bits first: on every device torch stores int64 little-endian)."""
    count = tensor.numel()
    if count:
        tensor.view(-1).copy_(words(key, (count + 3) // 4, tensor.device).view(torch.uint16)[:count])
    return tensor


def fast_uniform_(tensor: Tensor, low: float, high: float, key: int) -> Tensor:
    """Fill `tensor` with U(low, high) at 2^16 levels: low + (k + 1/2) (high - low) / 2^16."""
    if (done := _in_logical_order(fast_uniform_, tensor, low, high, key)) is not None:
        return done
    levels_(tensor, key)
    step = (high - low) / (1 << FAST_BITS)
    return tensor.add_(0.5).mul_(step).add_(low) if low else tensor.add_(0.5).mul_(step)


# -- many layers' draws in a few operations ---------------------------------------------------

def levels_of_keys(key: Tensor, count: int, dtype: torch.dtype) -> Tensor:
    """The first `count` 16-bit levels of the draw whose key is the one-entry int64 tensor `key`,
    as a flat `dtype` tensor (StreamPlan.levels for a single draw, traceable by torch.compile)."""
    return torch_words(key, (count + 3) // 4, key.device).view(torch.uint16)[:count].to(dtype)


class StreamPlan:
    """Where each of several draws' words lie in one flat tensor, so that one draw of every
    layer of a model takes a fixed number of tensor operations, however many layers there are.
    Made once per set of layers (and device); the keys change every step, the plan does not."""

    def __init__(self, sizes: list[int], device: torch.device):
        word_counts = [(size + 3) // 4 for size in sizes]
        counts = torch.tensor(word_counts, dtype=torch.int64)
        segment = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        starts = torch.cumsum(counts, 0) - counts
        positions = torch.arange(segment.numel(), dtype=torch.int64) - starts[segment] + 1
        self.segment = segment.to(device)  # which draw each word belongs to
        self.counters = positions.mul_(as_int64(GAMMA)).to(device)  # (i + 1) * GAMMA, per word
        # Each draw's levels, then the 0-3 levels of its last word that it leaves unused.
        self.pieces = [n for size, words in zip(sizes, word_counts) for n in (size, 4 * words - size)]

    def levels(self, keys: Tensor, dtype: torch.dtype) -> list[Tensor]:
        """The 16-bit levels of the draws keyed `keys` (one per size), as flat `dtype` tensors."""
        flat = mix64_(keys[self.segment].add_(self.counters)).view(torch.uint16).to(dtype)
        return list(flat.split(self.pieces)[0::2])
