"""Random draws for feedback weights: reproducible, cheap, and independent of the global RNG.

Every draw is identified by (seed, layer name, draw index); it is made in chunks of DRAW_CHUNK
entries, each from its own generator seeded by a hash of that identity and the chunk index. So
the same seed gives the same B whatever else consumed random numbers, a resumed run continues
the stream from the draw counter, DDP ranks agree without communicating, and a CPU can fill the
chunks on all its threads without the values depending on the thread count.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

DRAW_CHUNK = 1 << 18
# Draws made before every step (brsf) use 15 random bits per entry, not float32's 24: torch's CPU
# generator costs about as much per call either way, and one 63-bit call yields four 15-bit
# values. 32768 levels of U(low, high) are far finer than any effect of the magnitude distribution.
FAST_BITS = 15

_pool: ThreadPoolExecutor | None = None
_workspaces: dict[tuple, Tensor] = {}


def stream_seed(seed: int, layer_name: str, draw: int, chunk: int = 0) -> int:
    """A 63-bit seed from (seed, layer name, draw index, chunk index) alone."""
    digest = hashlib.sha256(f"{seed}\0{layer_name}\0{draw}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _for_each_chunk(tensor: Tensor, chunk_size: int, fill) -> None:
    global _pool
    chunks = list(enumerate(tensor.view(-1).split(chunk_size)))
    if tensor.device.type == "cpu" and len(chunks) > 1 and torch.get_num_threads() > 1:
        # torch's CPU generator fills on one thread; spread the chunks over the cores.
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=torch.get_num_threads())
        list(_pool.map(fill, chunks))
    else:
        for chunk in chunks:
            fill(chunk)


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
    def fill(indexed):
        index, chunk = indexed
        chunk.uniform_(low, high, generator=_generator(chunk.device, stream_seed(seed, layer_name, draw, index)))
    _for_each_chunk(tensor, DRAW_CHUNK, fill)
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


def workspace_like(tensor: Tensor) -> Tensor:
    """A scratch tensor with `tensor`'s shape and memory layout (channels_last included), so that
    element-wise work between the two runs in one dense pass. Under torch.compile a plain new
    tensor: the compiler plans its own memory (and cannot trace writes through as_strided)."""
    if torch.compiler.is_compiling():
        return torch.empty_like(tensor)
    scratch = workspace((tensor.numel(),), tensor.dtype, tensor.device)
    dense = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    return scratch.as_strided(tensor.shape, tensor.stride()) if dense else scratch.view(tensor.shape)


def fast_uniform_(tensor: Tensor, low: float, high: float, seed: int, layer_name: str, draw: int) -> Tensor:
    """Fill `tensor` with U(low, high) at 2^15 levels: low + (k + 1/2) (high - low) / 2^15, k uniform
    on {0, ..., 2^15 - 1}, four values per 63-bit generator call (the low 15 bits of each 16)."""
    if (done := _in_logical_order(fast_uniform_, tensor, low, high, seed, layer_name, draw)) is not None:
        return done
    numel = tensor.numel()
    words = workspace(((numel + 3) // 4,), torch.int64, tensor.device)

    def fill(indexed):
        index, chunk = indexed
        chunk.random_(generator=_generator(chunk.device, stream_seed(seed, layer_name, draw, index)))
    _for_each_chunk(words, DRAW_CHUNK // 4, fill)
    levels = words.view(torch.int16)[:numel].bitwise_and_((1 << FAST_BITS) - 1)
    tensor.view(-1).copy_(levels)
    step = (high - low) / (1 << FAST_BITS)
    return tensor.add_(0.5).mul_(step).add_(low) if low else tensor.add_(0.5).mul_(step)
