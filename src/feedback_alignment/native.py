"""The fused CPU kernel for the sign-concordant rules' per-step feedback, built on first use.

`signed_feedback_` writes B = sign(W) * magnitude and returns ||B||^2 and ||W||^2, in one read of
W and one write of B on every core (resources/signed_feedback.c); `random_words_` makes a draw's
random words (draws.py's stream) on every core. The PyTorch operations they replace give the
same values to the bit (tests/test_native.py); they remain the path on a GPU, for tensors the
kernel does not take, under torch.compile, and wherever the kernel cannot be built.

The kernel is compiled with the system C compiler ($CC, else cc) the first time it is needed and
kept in a cache directory ($FEEDBACK_ALIGNMENT_CACHE, else ~/.cache/feedback_alignment) under a
hash of its source and compiler, so a later process, or another job of a workflow, loads it in
milliseconds. FEEDBACK_ALIGNMENT_NATIVE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = "signed_feedback.c"
# No fused multiply-add: the AVX2 and the baseline builds of each function must agree to the bit.
_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_ENABLE_VARIABLE = "FEEDBACK_ALIGNMENT_NATIVE"

_library: ctypes.CDLL | None = None
_tried = False


class SquaredNorms(NamedTuple):
    """||B||_F^2 and ||W||_F^2, as computed on the way by the kernel that wrote B."""
    feedback: float
    weight: float


def _enabled_by_environment() -> bool:
    value = os.environ.get(_ENABLE_VARIABLE, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"{_ENABLE_VARIABLE}={os.environ[_ENABLE_VARIABLE]!r}: set it to 1 (use the fused "
                         "CPU kernel) or 0 (PyTorch operations only)")
    return value in ("1", "true", "yes", "on")


def _cache_directory() -> Path:
    if configured := os.environ.get("FEEDBACK_ALIGNMENT_CACHE"):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "feedback_alignment"


def _build(source: bytes, flags: list[str]) -> Path:
    """The compiled kernel for this source, compiler and flags, built now unless the cache has it."""
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True).stdout
    key = hashlib.sha256(source + version + " ".join(flags).encode()).hexdigest()[:16]
    directory = _cache_directory()
    target = directory / f"signed_feedback-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source_path = Path(scratch) / _SOURCE
        source_path.write_bytes(source)
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *flags, str(source_path), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            raise RuntimeError(f"{compiler} failed: {next((l for l in lines if 'error' in l), lines[0])}")
        # Renamed into place whole: another process building the same kernel at once is harmless.
        os.replace(built, target)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it is turned off or cannot be built (warned once)."""
    global _library, _tried
    if _tried:
        return _library
    enabled = _enabled_by_environment()  # before _tried: a bad value is refused at every call
    _tried = True
    if not enabled:
        return None
    try:
        _library = load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"feedback_alignment: the fused CPU kernel is not available ({error}); per-step "
                      f"feedback uses PyTorch operations, which give the same values more slowly. "
                      f"Set {_ENABLE_VARIABLE}=0 to silence this.", RuntimeWarning, stacklevel=2)
        return None
    log.debug("fused CPU kernel loaded from %s", _library._name)
    return _library


def load(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find in the cache) and load the kernel; raises where it cannot be built."""
    source = resources.files("feedback_alignment").joinpath("resources", _SOURCE).read_bytes()
    loaded = ctypes.CDLL(str(_build(source, [*_FLAGS, *extra_flags])))
    function = loaded.fa_signed_feedback
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_int, ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p]
    words = loaded.fa_random_words
    words.restype = None
    words.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return loaded


def loaded() -> str | None:
    """Where the kernel this process uses was loaded from, or None (not needed yet, off, or not
    built): for provenance; builds nothing."""
    return None if _library is None else _library._name


def reset() -> None:
    """Forget the loaded kernel, so that the next use reads FEEDBACK_ALIGNMENT_NATIVE again."""
    global _library, _tried
    _library, _tried = None, False


def takes(feedback: Tensor, weight: Tensor, magnitude: Tensor | None = None) -> bool:
    """Whether the kernel can write this B: dense, non-empty float32 CPU tensors of one shape,
    outside tracing."""
    if torch.compiler.is_compiling() or weight.numel() == 0:  # a traced tensor has no memory to hand to C
        return False
    tensors = (feedback, weight) if magnitude is None else (feedback, weight, magnitude)
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                and t.shape == weight.shape for t in tensors)
            and library() is not None)


def signed_feedback_(feedback: Tensor, weight: Tensor, magnitude: Tensor | None = None,
                     key: int | None = None, step: float = 0.0,
                     kernel: ctypes.CDLL | None = None) -> SquaredNorms:
    """B = sign(W) * magnitude, where the magnitude is `magnitude`, or the levels (2k + 1) * step
    of the draw keyed `key` (draws.py), or else 1. Call only where `takes` says yes (`kernel`:
    another build of it, for tests)."""
    norms = (ctypes.c_double * 2)()
    address = None if magnitude is None else magnitude.data_ptr()
    status = (kernel or library()).fa_signed_feedback(weight.data_ptr(), feedback.data_ptr(), weight.numel(),
                                                      address, key is not None, key or 0, step, norms)
    if status != 0:
        raise MemoryError("fa_signed_feedback: out of memory for its partial sums")
    return SquaredNorms(norms[0], norms[1])


def random_words_(out: Tensor, key: int, first: int = 0, kernel: ctypes.CDLL | None = None) -> Tensor:
    """Fill the contiguous int64 CPU tensor `out` with words first, first + 1, ... of the draw
    keyed `key`. Call only where `library()` is not None."""
    if out.dtype != torch.int64 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"random_words_ fills a contiguous int64 CPU tensor, not {out.dtype} on {out.device}")
    (kernel or library()).fa_random_words(key, first, out.numel(), out.data_ptr())
    return out
