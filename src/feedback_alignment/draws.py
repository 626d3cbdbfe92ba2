"""Random draws for feedback weights: reproducible, cheap, and independent of the global RNG.

Every draw is identified by (seed, layer name, draw index); it is made in chunks, each from its
own generator seeded by a hash of that identity and the chunk index. So the same seed gives the
same B whatever else consumed random numbers, a resumed run continues the stream from the draw
counter, DDP ranks agree without communicating, and the values never depend on how many threads
a machine has. The generators are torch's (Mersenne Twister on a CPU, Philox on a GPU), except
numpy's SFC64 for the per-step draws on a CPU. Here those chunks are filled one after another: a
Python thread pool was slower on a 2-core CPU, where OpenMP's workers keep spinning for a while
after every parallel region of the training step and take the pool's cores (BENCHMARKS.md).
native.py's fused kernel, when it is built, makes the same SFC64 words on those OpenMP threads
themselves.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from . import native

DRAW_CHUNK = 1 << 18
# Draws made before every step (brsf) use 16 random bits per entry, not float32's 24: a
# generator costs about as much per call either way, and one 64-bit word read as four uint16
# values gives four levels with no masking pass. 65536 levels of U(low, high) are far finer than
# any effect of the magnitude distribution.
FAST_BITS = 16
FAST_CHUNK = 1 << 20  # entries per generator in those draws (smaller chunks cost more on a CPU)
assert FAST_CHUNK % native.LEVEL_CHUNK_MULTIPLE == 0

_workspaces: dict[tuple, Tensor] = {}


def stream_seed(seed: int, layer_name: str, draw: int, chunk: int = 0) -> int:
    """A 63-bit seed from (seed, layer name, draw index, chunk index) alone."""
    digest = hashlib.sha256(f"{seed}\0{layer_name}\0{draw}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    # A fresh generator per chunk: cheap next to the draw, and nothing unpicklable kept around.
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _in_logical_order(fill_, tensor: Tensor, *args) -> Tensor | None:
    """Draws follow the logical (row-major) order of entries, so that a channels_last buffer gets
    the same values as a contiguous one: fill a contiguous copy and copy it over."""
    if tensor.is_contiguous():
        return None
    return tensor.copy_(fill_(torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device), *args))


def uniform_(tensor: Tensor, low: float, high: float, seed: int, layer_name: str, draw: int) -> Tensor:
    """Fill `tensor` with U(low, high) at full float precision."""
    if (done := _in_logical_order(uniform_, tensor, low, high, seed, layer_name, draw)) is not None:
        return done
    for index, chunk in enumerate(tensor.view(-1).split(DRAW_CHUNK)):
        chunk.uniform_(low, high, generator=_generator(chunk.device, stream_seed(seed, layer_name, draw, index)))
    return tensor


def workspace(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable scratch tensor: per-step feedback work would otherwise allocate (and
    page-fault) a weight-sized temporary for every layer at every step. One per (device, dtype);
    the caller must be done with it before asking again."""
    numel = int(torch.Size(shape).numel())
    key = (torch.device(device), dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def _random_words(count: int, seed: int, device: torch.device) -> Tensor:
    """`count` random 64-bit words from one generator seeded with `seed`."""
    if device.type == "cpu":
        # numpy's SFC64 makes a word in about half the time torch's CPU Mersenne Twister takes.
        return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))
    return torch_random_words(count, seed, device)


def torch_random_words(count: int, seed: int, device: torch.device) -> Tensor:
    """`count` random words from torch's generator of `device` (Philox on a GPU), all 64 bits
    random: random_ over the whole int64 range. (Plain random_() stops at 2^63 - 1 and never
    sets the top bit, which drew every fourth 16-bit level from half its range.)"""
    words = torch.empty(count, dtype=torch.int64, device=device)
    return words.random_(-(2**63), None, generator=_generator(device, seed))


def _fast_levels_(tensor: Tensor, seed: int, layer_name: str, draw: int) -> Tensor:
    """Fill the contiguous `tensor` with integers k uniform on {0, ..., 2^16 - 1}: a random 64-bit
    word read as four uint16 values, FAST_CHUNK entries per generator."""
    if tensor.numel() == 0:  # no words to read (a layer with no inputs or outputs)
        return tensor
    for index, chunk in enumerate(tensor.view(-1).split(FAST_CHUNK)):
        words = _random_words((chunk.numel() + 3) // 4, stream_seed(seed, layer_name, draw, index), chunk.device)
        chunk.copy_(words.view(torch.uint16)[:chunk.numel()])
        # Freed before the next chunk's words are allocated, so that malloc hands the same memory
        # back: with two chunks alive at once it maps fresh pages each time, and the page faults
        # (about 2000 per resnet18 step) took longer than the draw itself.
        del words
    return tensor


def fast_uniform_(tensor: Tensor, low: float, high: float, seed: int, layer_name: str, draw: int) -> Tensor:
    """Fill `tensor` with U(low, high) at 2^16 levels: low + (k + 1/2) (high - low) / 2^16, k uniform
    on {0, ..., 2^16 - 1}."""
    if (done := _in_logical_order(fast_uniform_, tensor, low, high, seed, layer_name, draw)) is not None:
        return done
    _fast_levels_(tensor, seed, layer_name, draw)
    step = (high - low) / (1 << FAST_BITS)
    return tensor.add_(0.5).mul_(step).add_(low) if low else tensor.add_(0.5).mul_(step)


def _chunk_states(numel: int, seed: int, layer_name: str, draw: int) -> np.ndarray:
    """The starting states (chunks x 4 words) of the SFC64 generators of a per-step CPU draw."""
    return np.stack([np.random.SFC64(stream_seed(seed, layer_name, draw, index)).state["state"]["state"]
                     for index in range(-(-numel // FAST_CHUNK))])


def fast_uniform_times_sign_(tensor: Tensor, high: float, sign_of: Tensor, seed: int, layer_name: str,
                             draw: int) -> native.SquaredNorms | None:
    """Fill `tensor` with fast_uniform_'s U(0, high) draw times sign(sign_of), the same values to
    the bit, in fewer passes: with k the levels and s = sign(sign_of), s (2k + 1) high / 2^17 is
    s (k + 1/2) high / 2^16. Returns ||tensor||^2 and ||sign_of||^2 where the fused CPU kernel
    made the draw (it sums them on the way), else None."""
    step = high / (1 << (FAST_BITS + 1))
    if native.takes(tensor, sign_of):
        states = _chunk_states(tensor.numel(), seed, layer_name, draw)
        return native.signed_feedback_(tensor, sign_of, chunk_states=states, chunk=FAST_CHUNK, step=step)
    if not tensor.is_contiguous():  # draws follow the logical order of entries (_in_logical_order)
        contiguous = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        norms = fast_uniform_times_sign_(contiguous, high, sign_of, seed, layer_name, draw)
        tensor.copy_(contiguous)
        return norms
    # k as floats first: an addcmul mixing int16 and float takes a slow element-wise cast (4x).
    _fast_levels_(tensor, seed, layer_name, draw)
    signs = torch.sign(sign_of, out=workspace(tensor.shape, tensor.dtype, tensor.device))
    # s + 2 s k = s (2k + 1) in one addcmul
    torch.addcmul(signs, signs, tensor, value=2, out=tensor)
    tensor.mul_(step)
    return None
