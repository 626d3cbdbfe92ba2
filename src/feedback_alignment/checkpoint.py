"""A training run's checkpoint: what it holds, when one may be resumed, and how.

checkpoint.pt holds the model and optimizer states, the RNG states, the loop's `TrainState` and
the config and code version that wrote it. A run resumes only from a checkpoint of the same
format, config (placement aside) and code version; anything else is refused with a message
that names the difference, because resuming it would silently mix two experiments.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .provenance import git_sha, torch_save

# The layout of checkpoint.pt; raised whenever a checkpoint of the old layout cannot be resumed.
FORMAT = 2
FORMAT_CHANGES = {
    2: "the training state became the TrainState record (checkpoints of format 1 have no 'format' key)",
}

# Flags that change where or how fast a run goes, not what it computes (beyond float rounding).
PLACEMENT_KEYS = ("out", "data", "threads", "device", "workers", "channels_last", "compile",
                  "runs_per_gpu", "dist_backend")


class CheckpointMismatch(ValueError):
    """A checkpoint that this run must not resume from."""


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model, the optimizer and the RNG states."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batches: dict | None = None  # the position in the interrupted epoch's batch order
    sums: dict | None = None  # the interrupted epoch's loss and error sums so far
    epoch_seconds: float = 0.0  # the interrupted epoch's training time so far
    history: list = field(default_factory=list)  # one row per completed epoch
    alignment: list = field(default_factory=list)  # one row per layer per alignment measurement
    best_val: float = math.inf
    best_epoch: int | None = None
    # The best epoch's test errors (top-k, %) and loss: evaluation.json's values.
    best_test: dict | None = None


def semantic_config(config: dict) -> dict:
    """The config without its placement: what must match for a resume to be the same run."""
    return {k: v for k, v in config.items() if k not in PLACEMENT_KEYS}


def check_checkpoint(checkpoint: dict, config: dict, path: Path) -> None:
    """Refuse to resume from a checkpoint of another format, config or code version."""
    written_format = checkpoint.get("format", 1)
    if written_format != FORMAT:
        change = FORMAT_CHANGES.get(max(written_format, FORMAT), "unknown to this code")
        raise CheckpointMismatch(f"{path} has checkpoint format {written_format}, this code reads format "
                                 f"{FORMAT} ({change}); delete it to start over")
    theirs, ours = checkpoint["config"], semantic_config(config)
    differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differing:
        key = differing[0]
        raise CheckpointMismatch(f"{path} was written with a different config ({key}: "
                                 f"{theirs.get(key)!r} there, {ours.get(key)!r} now); "
                                 "delete it to start over")
    sha = git_sha()
    if checkpoint["git_sha"] != sha and "unknown" not in (checkpoint["git_sha"], sha):
        raise CheckpointMismatch(f"{path} was written by code version {checkpoint['git_sha']}, "
                                 f"this is {sha}; delete it to start over")


def rng_states(device: torch.device) -> dict:
    states = dict(torch=torch.get_rng_state())
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, every tensor on the CPU: the RNG states must reach set_rng_state as CPU byte
    tensors (loaded onto a GPU, torch refuses them), and load_state_dict copies model and
    optimizer states onto the model's device itself."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(path: Path, config: dict, model, optimizer, device: torch.device, state: TrainState) -> None:
    torch_save(path, dict(format=FORMAT, config=semantic_config(config), git_sha=git_sha(),
                          model=model.state_dict(), optimizer=optimizer.state_dict(),
                          rng=rng_states(device), state=dataclasses.asdict(state)))


def resume(path: Path, config: dict, model, optimizer, device: torch.device) -> TrainState:
    """Model, optimizer and RNG states restored from `path` (checked first), and the loop's state,
    its running sums back on the run's device."""
    checkpoint = load_checkpoint(path)
    check_checkpoint(checkpoint, config, path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_states(checkpoint["rng"], device)
    state = TrainState(**checkpoint["state"])
    if state.sums is not None:
        state.sums = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                      for key, value in state.sums.items()}
    return state
