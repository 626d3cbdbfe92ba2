"""Where a result came from (config, code version, torch, device), and atomic file writes.

Every output is written to a temporary name in its own directory and renamed into place, so a
killed job never leaves a half-written file that a later step could mistake for a result.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import native

PACKAGE_DIR = Path(__file__).resolve().parent


def git_sha() -> str:
    """The commit of the checkout this package runs from, '+dirty' if it has changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FEEDBACK_ALIGNMENT_GIT_SHA", "unknown")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def provenance(device: torch.device) -> dict:
    return dict(git_sha=git_sha(), torch=torch.__version__, python=platform.python_version(),
                device=str(device), device_name=device_name(device), host=socket.gethostname(),
                threads=torch.get_num_threads(), fused_cpu_kernel=native.loaded(),
                time=datetime.now(timezone.utc).isoformat(timespec="seconds"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path, data) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path, frame) -> None:
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def torch_save(path, obj) -> None:
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def save_figure(path, figure) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=Path(path).suffix.lstrip(".") or "png", dpi=130,
                       bbox_inches="tight")
