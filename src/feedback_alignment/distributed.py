"""Data-parallel training under torchrun, and sharing one machine's GPUs between runs.

    torchrun --standalone --nproc-per-node 8 -m feedback_alignment train ...   # one node
    srun torchrun --nnodes $N --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint $HEAD:29500 -m feedback_alignment train ...            # several nodes

Every rank sees the same global batch order (it is seeded by the run's seed) and takes its
contiguous share of each batch, so the gradient that DDP averages is the gradient of the global
batch: a run on N processes equals the single-process run with the same --batch-size. Feedback
buffers need no communication: B, the random magnitudes and the brsf draw counter are functions
of the seed, the layer name and the (all-reduced, hence identical) weights. Only rank 0 writes.
"""
from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (in float64, so that counts stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Element-wise OR over ranks: ranks agree on when to stop."""
        return [total > 0 for total in self.sum([float(f) for f in flags], device)]


@dataclass(frozen=True)
class CudaSeen:
    """What CUDA this process sees. The decisions below take it as a value, so that the choices a
    rank makes on GPUs are the same function, and tested, on a machine without one."""
    usable: bool
    gpus: int

    @classmethod
    def here(cls) -> CudaSeen:
        return cls(torch.cuda.is_available(), torch.cuda.device_count())


def check_device_usable(device_name: str, cuda: CudaSeen | None = None) -> None:
    """A run asked for a GPU runs on it or stops here, in one line: never quietly on the CPU."""
    if not device_name.startswith("cuda"):
        return
    cuda = cuda or CudaSeen.here()
    if not cuda.usable:
        raise ValueError(f"--device {device_name}: CUDA is not usable in this process "
                         "(torch.cuda.is_available() is False: no GPU visible to it, or a CPU-only torch "
                         "build); a job given GPUs stops rather than train on the CPU")
    index = torch.device(device_name).index
    if index is not None and index >= cuda.gpus:
        raise ValueError(f"--device {device_name}: this process sees {cuda.gpus} GPU(s)")


def init_world(device_name: str, batch_size: int, backend: str = "auto") -> tuple[World, str]:
    """Join the process group that torchrun describes in the environment, if any; returns the
    world and the device name this rank should use."""
    world, device_name, backend = plan_world(os.environ, device_name, batch_size, backend)
    if world.distributed:
        if device_name.startswith("cuda"):
            torch.cuda.set_device(torch.device(device_name))
        dist.init_process_group(backend)
    return world, device_name


def plan_world(environment: Mapping[str, str], device_name: str, batch_size: int, backend: str,
               cuda: CudaSeen | None = None) -> tuple[World, str, str]:
    """(world, device, process-group backend) of the rank that the launcher's environment
    describes, checked before it joins a group; one process (no launcher) keeps its device, and
    CUDA is asked nothing (`cuda`: what this process sees, by default torch's answer)."""
    size = int(environment.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device_name, backend
    if batch_size % size:
        raise ValueError(f"--batch-size {batch_size} does not divide among {size} processes")
    rank, local_rank = int(environment["RANK"]), int(environment.get("LOCAL_RANK", "0"))
    cuda = cuda or CudaSeen.here()
    check_device_usable(device_name, cuda)
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and cuda.usable)
    local_size = int(environment.get("LOCAL_WORLD_SIZE", "1"))
    device_name, backend = process_placement(use_cuda, local_rank, local_size, cuda.gpus, backend)
    return World(rank, size, local_rank), device_name, backend


BACKENDS = ("auto", "nccl", "gloo")


def process_placement(use_cuda: bool, local_rank: int, local_size: int, gpus: int,
                      backend: str = "auto") -> tuple[str, str]:
    """(device, process-group backend) of a node's local_rank-th of local_size processes: on the
    CPU gloo; on GPUs the GPU local_rank mod gpus, with nccl when every process has a GPU of its
    own and gloo when processes share one (nccl refuses two ranks on one GPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend {backend}: not one of {', '.join(BACKENDS)}")
    if not use_cuda:
        if backend == "nccl":
            raise ValueError("--dist-backend nccl needs CUDA; on the CPU the processes use gloo")
        return "cpu", "gloo"
    sharing = local_size > gpus
    if backend == "nccl" and sharing:
        raise ValueError(f"--dist-backend nccl: {local_size} processes share {gpus} GPU(s) on this node, and "
                         "nccl takes one process per GPU; use --dist-backend gloo")
    chosen = backend if backend != "auto" else ("gloo" if sharing else "nccl")
    return f"cuda:{local_rank % gpus}", chosen


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def lock_directory() -> Path:
    return Path(os.environ.get("FEEDBACK_ALIGNMENT_LOCKS", Path(tempfile.gettempdir()) / "feedback_alignment-gpus"))


def _shared_lock_directory() -> Path:
    """The lock folder, usable by every user of the node: world-writable with the sticky bit, as
    /tmp is (each user may add lock files; none may remove another's)."""
    directory = lock_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if directory.stat().st_uid == os.getuid():
        os.chmod(directory, 0o1777)
    return directory


def _open_shared(path: Path):
    """A lock file that any user can open for writing (flock needs no more), whoever made it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    if os.fstat(descriptor).st_uid == os.getuid():
        os.fchmod(descriptor, 0o666)  # the umask took bits away at creation
    return os.fdopen(descriptor, "r+")


def claim_gpu_slot(device_ids: list[str], runs_per_gpu: int, poll_seconds: float = 5.0):
    """Several small runs share a machine's GPUs: take the first free (GPU, slot) of
    `runs_per_gpu` slots per GPU, waiting while all are taken. Returns (index into device_ids,
    the open lock file, which must stay open for the run's lifetime; the kernel releases the lock
    when the process ends, however it ends). GPUs are named by UUID, so jobs that SLURM confines
    to different GPUs of one node never contend."""
    directory = _shared_lock_directory()
    told = False
    while True:
        for slot in range(runs_per_gpu):  # fill every GPU once before doubling up
            for index, device_id in enumerate(device_ids):
                handle = _open_shared(directory / f"{device_id}.slot{slot}.lock")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                handle.truncate()  # at 0, where the file was opened: drop a longer id left before
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                return index, handle
        if not told:
            print(f"waiting for a free GPU: {runs_per_gpu} run(s) per GPU already use all "
                  f"{len(device_ids)} (--runs-per-gpu to share more, --device cuda:K to pick one)",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(poll_seconds)


def cuda_device_ids() -> list[str]:
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
