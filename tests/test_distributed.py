"""Data-parallel training under real torchrun processes (gloo on the CPU), and GPU slot sharing."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from feedback_alignment import data
from feedback_alignment.distributed import World, claim_gpu_slot
from conftest import FEEDBACK_RULES, cli, cli_ok, computed_once, scale_for

FLAGS = ["--arch", "convnet", "--depth", "3", "--width", "8", "--no-batch-norm", "--rule", "brsf",
         "--scale", "match", "--epochs", "2", "--batch-size", "32", "--max-batches", "8", "--lr", "0.05",
         "--pad", "1", "--flip", "--seed", "5", "--device", "cpu", "--threads", "1",
         "--alignment-every", "5", "--alignment-batch", "32"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.pt"
    data.prepare_digits(path)
    return path


def run(command, **kwargs):
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return process


def train(launcher, digits, out, *extra, env=None):
    return run([*launcher, "-m", "feedback_alignment", "train", "--dataset", "digits",
                "--data", str(digits), "--out", str(out), *FLAGS, *extra], env=env)


# Loaded by every Python process of the launch (sitecustomize on PYTHONPATH): an audit hook that
# logs each file the process opens for writing or renames into place, one log per rank.
WRITE_LOGGER = textwrap.dedent("""
    import os, sys
    _log = os.open(os.path.join(os.environ["WRITE_LOG_DIR"], f"rank{os.environ.get('RANK', 'x')}-{os.getpid()}.log"),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
                os.write(_log, f"open {os.fsdecode(args[0])}\\n".encode())
        elif event in ("os.rename", "os.replace"):
            os.write(_log, f"rename {os.fsdecode(args[1])}\\n".encode())

    sys.addaudithook(_hook)
""")


@pytest.fixture(scope="module")
def single_and_parallel(digits, tmp_path_factory):
    root = computed_once(tmp_path_factory, "single-and-parallel", lambda root: train_both(digits, root))
    return root / "single", root / "parallel"


def train_both(digits, root):
    cli_ok("train", "--dataset", "digits", "--data", str(digits), "--out", str(root / "single"), *FLAGS)
    hook, logs = root / "hook", root / "write-logs"
    hook.mkdir(), logs.mkdir()
    (hook / "sitecustomize.py").write_text(WRITE_LOGGER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "WRITE_LOG_DIR": str(logs)}
    train(TORCHRUN, digits, root / "parallel", env=env)


@pytest.mark.slow(seconds=15)
def test_two_processes_equal_one_process_with_the_same_global_batch(single_and_parallel):
    single, parallel = single_and_parallel
    a, b = (pd.read_csv(d / "history.csv") for d in (single, parallel))
    assert list(a["images"]) == list(b["images"]) == [8 * 32] * 2  # each image once, not once per rank
    for column in ("train_loss", "train_error", "val_error", "test_error"):
        pd.testing.assert_series_equal(b[column], a[column], rtol=1e-4, atol=1e-3)
    wa, wb = (torch.load(d / "best.pt", weights_only=True)["model"] for d in (single, parallel))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=key)
    # The brsf draw counter after the last step: one draw at conversion, one per step (2 x 8).
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (single, parallel))
    counters = [k for k in ca if k.endswith("feedback_draws")]
    assert counters and all(int(ca[k]) == int(cb[k]) == 17 for k in counters)
    ma, mb = (pd.read_csv(d / "alignment.csv") for d in (single, parallel))
    pd.testing.assert_frame_equal(mb[["layer", "step"]], ma[["layer", "step"]])
    result = json.loads((parallel / "result.json").read_text())
    assert result["placement"]["world_size"] == 2 and result["status"] == "completed"


@pytest.mark.slow
def test_only_rank_zero_writes(single_and_parallel):
    single, parallel = single_and_parallel
    assert sorted(p.name for p in parallel.iterdir()) == sorted(p.name for p in single.iterdir())
    # Every file of the run is written by rank 0 and none by rank 1 (which would write the same
    # names: the listing above cannot tell).
    logs = parallel.parent / "write-logs"
    written = {rank: {line.split(" ", 1)[1] for log in logs.glob(f"rank{rank}-*.log")
                      for line in log.read_text().splitlines() if str(parallel) in line}
               for rank in (0, 1)}
    assert any(path.endswith("result.json") for path in written[0]), written[0]
    assert written[1] == set()


RANK_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.nn.functional as F
    import feedback_alignment as fa
    from feedback_alignment.models import build_model
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for rule_and_scale in sys.argv[2:]:  # every rule in one launch: a torchrun start costs seconds
        rule, scale = rule_and_scale.split(":")
        torch.manual_seed(100 + rank)  # different global RNG state per rank: B must not depend on it
        model = build_model("resnet20", num_classes=10, in_channels=3, image_size=8)
        fa.convert(model, rule=rule, scale=scale, seed=7)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(rank)  # each rank its own data
        for _ in range(3):
            images = torch.randn(4, 3, 8, 8, generator=generator)
            labels = torch.randint(0, 10, (4,), generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            fa.mirror.mirror_step(model.module)  # wm: B learns from its own noise stream
        feedback = {name: layer.feedback_weight for name, layer in fa.feedback_layers(model.module)}
        torch.save(feedback, f"{sys.argv[1]}/{rule}-rank{rank}.pt")
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def feedback_on_each_rank(tmp_path_factory):
    """Every rule's B after three data-parallel steps on different data per rank, from one launch."""
    def launch(root):
        script = root / "ranks.py"
        script.write_text(RANK_SCRIPT)
        run([*TORCHRUN, str(script), str(root), *(f"{rule}:{scale_for(rule)}" for rule in FEEDBACK_RULES)])
    return computed_once(tmp_path_factory, "feedback-on-each-rank", launch)


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_feedback_weights_are_identical_on_every_rank(rule, feedback_on_each_rank):
    zero, one = (torch.load(feedback_on_each_rank / f"{rule}-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(zero) == 20
    for name in zero:
        assert torch.equal(zero[name], one[name]), name


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_as(monkeypatch, **variables: str) -> None:
    """This process's environment as a launcher starts one rank: these variables, none other of
    torchrun's (left over from the shell that runs the tests)."""
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)


def test_a_rank_given_a_backend_it_cannot_use_is_refused_before_it_joins_a_group(monkeypatch):
    from feedback_alignment.distributed import init_world
    launched_as(monkeypatch, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    with pytest.raises(ValueError) as error:  # (on a GPU node two processes sharing one GPU say the same)
        init_world("cpu", 32, "nccl")
    assert str(error.value) == "--dist-backend nccl needs CUDA; on the CPU the processes use gloo"


def test_a_batch_that_does_not_divide_among_processes_is_refused(digits, tmp_path, monkeypatch):
    # As torchrun starts rank 0 of 2: refused before it joins a group (so in this process).
    launched_as(monkeypatch, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    status, stderr = cli("train", "--dataset", "digits", "--data", str(digits), "--out", str(tmp_path / "run"),
                         *FLAGS, "--batch-size", "33")
    assert (status, stderr.strip()) == (1, "train: --batch-size 33 does not divide among 2 processes")
    assert not (tmp_path / "run").exists()


# The other rank of a two-process group: plain torch, so that what is checked is this process's
# side (distributed.py); it prints what its collectives returned.
PEER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=int(sys.argv[2]), world_size=2)
    summed = torch.tensor([10.0, 2.0, 0.0], dtype=torch.float64)
    dist.all_reduce(summed)
    flags = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    dist.all_reduce(flags)
    dist.barrier()
    print(summed.tolist(), flags.tolist(), flush=True)
    dist.destroy_process_group()
""")


# Rank 0 with LOCAL_RANK and LOCAL_WORLD_SIZE left out, as a launcher other than torchrun may
# (one node); rank 1, the second process of its node, as torchrun starts it (not the main rank).
@pytest.mark.parametrize("rank, local", [(0, {}), (1, dict(LOCAL_RANK="1", LOCAL_WORLD_SIZE="2"))])
def test_a_rank_joins_torchruns_group_and_sums_and_agrees_with_the_other(rank, local, monkeypatch):
    """init_world reads the launcher's environment (on the CPU: gloo), then sum, any and barrier
    meet the other rank's collectives; close_world leaves the group."""
    import socket

    import torch.distributed as dist
    from feedback_alignment.distributed import close_world, init_world

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launched_as(monkeypatch, WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **local)
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(port), str(1 - rank)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        world, device = init_world("auto", 32)
        try:
            assert (world, device) == (World(rank=rank, size=2, local_rank=rank), "cpu")
            assert world.distributed and world.is_main == (rank == 0) and dist.get_backend() == "gloo"
            # 2**53 + 2 is exact in float64 only (float32 makes it 2**53): counts must stay exact.
            assert world.sum([1.0, 2.0 ** 53, 5.0], torch.device("cpu")) == [11.0, 2.0 ** 53 + 2, 5.0]
            assert world.any([False, False, False], torch.device("cpu")) == [False, False, True]
            world.barrier()
        finally:
            close_world(world)
        assert not dist.is_initialized()
        out, err = peer.communicate(timeout=60)
    finally:
        peer.kill()
    assert peer.returncode == 0, err[-2000:]
    assert out.split("] [") == ["[11.0, 9007199254740994.0, 5.0", "0.0, 0.0, 1.0]\n"]


def test_one_process_is_a_world_of_one_that_asks_nothing_of_torch_distributed(monkeypatch):
    from feedback_alignment.distributed import check_device_usable, close_world, init_world

    launched_as(monkeypatch)  # no launcher
    world, device = init_world("cuda:7", 33)  # neither the batch nor the device is checked here
    assert (world, device) == (World(), "cuda:7")
    assert (world.rank, world.size, world.local_rank, world.distributed, world.is_main) == (0, 1, 0, False, True)
    assert world.share(33) == slice(0, 33)
    assert world.sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert world.any([True, False], torch.device("cpu")) == [True, False]
    world.barrier(), close_world(world)  # no group: nothing to meet, nothing to leave
    # A group someone else made (a notebook, a launcher) is not a single run's to leave.
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        close_world(World())
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    assert World(1, 2).share(32) == slice(16, 32) and not World(1, 2).is_main
    check_device_usable("cpu"), check_device_usable("auto")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError) as error:
            check_device_usable("cuda:0")
        assert str(error.value) == (
            "--device cuda:0: CUDA is not usable in this process (torch.cuda.is_available() is False: no GPU "
            "visible to it, or a CPU-only torch build); a job given GPUs stops rather than train on the CPU")


def test_world_shares_split_a_batch_without_overlap():
    shares = [World(rank, 4).share(32) for rank in range(4)]
    rows = torch.arange(32)
    assert torch.equal(torch.cat([rows[s] for s in shares]), rows)


def test_gpu_slots_spread_runs_over_gpus_then_double_up(tmp_path, monkeypatch, capsys):
    import threading

    locks = tmp_path / "not" / "yet" / "there"  # made, parents too, open to every user of the node
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_LOCKS", str(locks))
    gpus = ["GPU-aaa", "GPU-bbb"]
    claim_gpu_slot(["GPU-zzz"], runs_per_gpu=1)[1].close()
    (locks / "GPU-aaa.slot0.lock").write_text("a much longer line than a process id\n")  # an old run's
    claims = [claim_gpu_slot(gpus, runs_per_gpu=2) for _ in range(4)]
    assert [index for index, _ in claims] == [0, 1, 0, 1]
    assert locks.stat().st_mode & 0o7777 == 0o1777
    for gpu, slot in (("aaa", 0), ("bbb", 0), ("aaa", 1), ("bbb", 1)):
        path = locks / f"GPU-{gpu}.slot{slot}.lock"
        assert path.read_text() == f"{os.getpid()}\n" and path.stat().st_mode & 0o777 == 0o666
    # All four slots are taken: a fifth run says so once and waits (flock: another open file
    # description of this process is refused like another process)...
    fifth = []
    waiter = threading.Thread(target=lambda: fifth.append(claim_gpu_slot(gpus, 2, poll_seconds=0.02)))
    waiter.start()
    time.sleep(0.3)  # about 15 looks at the slots
    assert waiter.is_alive()
    claims[1][1].close()  # ...until the run on GPU-bbb, slot 0 ends, and takes its place.
    waiter.join(timeout=30)
    assert not waiter.is_alive() and fifth[0][0] == 1
    assert capsys.readouterr().err == ("waiting for a free GPU: 2 run(s) per GPU already use all 2 "
                                       "(--runs-per-gpu to share more, --device cuda:K to pick one)\n")
    for _, handle in claims + fifth:
        handle.close()


def test_gpu_locks_live_in_the_temporary_folder_unless_the_environment_says(monkeypatch):
    import tempfile

    from feedback_alignment.distributed import lock_directory

    monkeypatch.delenv("FEEDBACK_ALIGNMENT_LOCKS", raising=False)
    assert lock_directory() == Path(tempfile.gettempdir()) / "feedback_alignment-gpus"
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_LOCKS", "/somewhere/else")
    assert lock_directory() == Path("/somewhere/else")


def test_gpu_slots_work_for_a_second_user_of_the_node(monkeypatch):
    """A lock folder and lock files made by one user must serve the next user's jobs: open a lock
    file for writing and lock it, and add lock files of its own (the second user runs a shell,
    since this user's Python may be out of its reach)."""
    import pwd
    import shutil
    import tempfile
    if os.getuid() != 0 or shutil.which("flock") is None:
        pytest.skip("needs root (to run a process as the user nobody) and flock(1)")
    nobody = pwd.getpwnam("nobody").pw_uid
    parent = Path(tempfile.mkdtemp(prefix="fa-locks-", dir="/tmp"))
    try:
        parent.chmod(0o755)
        locks = parent / "locks"
        monkeypatch.setenv("FEEDBACK_ALIGNMENT_LOCKS", str(locks))
        index, handle = claim_gpu_slot(["GPU-aaa"], runs_per_gpu=1)  # this user makes folder and file
        handle.close()
        other = subprocess.run(
            ["/bin/sh", "-c", 'exec 3>>"$0/GPU-aaa.slot0.lock" && flock -n 3 && touch "$0/GPU-bbb.slot0.lock"',
             str(locks)], capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.setuid(nobody))
        assert other.returncode == 0, other.stderr
        assert (locks / "GPU-bbb.slot0.lock").stat().st_uid == nobody
        index, handle = claim_gpu_slot(["GPU-bbb"], runs_per_gpu=1)  # and back: nobody's file serves us
        handle.close()
    finally:
        shutil.rmtree(parent)


def test_processes_go_to_gpus_with_the_backend_that_takes_them():
    from feedback_alignment.distributed import process_placement
    assert process_placement(False, 1, 2, 0) == ("cpu", "gloo")
    # one process per GPU: nccl; more processes than GPUs: they share (round robin) over gloo
    assert process_placement(True, 3, 8, 8) == ("cuda:3", "nccl")
    assert process_placement(True, 1, 2, 1) == ("cuda:0", "gloo")
    assert process_placement(True, 3, 4, 2, "gloo") == ("cuda:1", "gloo")
    assert process_placement(True, 0, 2, 2, "gloo") == ("cuda:0", "gloo")  # asked for: kept
    with pytest.raises(ValueError) as sharing:
        process_placement(True, 1, 2, 1, "nccl")
    assert str(sharing.value) == ("--dist-backend nccl: 2 processes share 1 GPU(s) on this node, and nccl takes one "
                                  "process per GPU; use --dist-backend gloo")
    with pytest.raises(ValueError) as cpu:
        process_placement(False, 0, 2, 0, "nccl")
    assert str(cpu.value) == "--dist-backend nccl needs CUDA; on the CPU the processes use gloo"
    with pytest.raises(ValueError) as unknown:
        process_placement(True, 0, 1, 1, "mpi")
    assert str(unknown.value) == "--dist-backend mpi: not one of auto, nccl, gloo"


def test_a_rank_plans_its_device_and_backend_from_the_launcher_and_the_gpus_it_sees():
    """What init_world decides before it joins a group, with the GPUs a process sees given as a
    value: the choices ranks make on a GPU node, checked on a machine without one."""
    from feedback_alignment.distributed import CudaSeen, plan_world
    eight_gpus, one_gpu, no_cuda = CudaSeen(True, 8), CudaSeen(True, 1), CudaSeen(False, 0)
    # Rank 11 of 16 is the 4th process of its 8-process node: its own GPU, over nccl.
    node = dict(WORLD_SIZE="16", RANK="11", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8")
    assert plan_world(node, "auto", 32, "auto", eight_gpus) == (World(11, 16, 3), "cuda:3", "nccl")
    assert plan_world(node, "cuda", 32, "auto", eight_gpus) == (World(11, 16, 3), "cuda:3", "nccl")
    assert plan_world(node, "cuda:0", 32, "gloo", eight_gpus) == (World(11, 16, 3), "cuda:3", "gloo")
    assert plan_world(node, "cpu", 32, "auto", eight_gpus) == (World(11, 16, 3), "cpu", "gloo")
    assert plan_world(node, "auto", 32, "auto", no_cuda) == (World(11, 16, 3), "cpu", "gloo")
    # Eight processes on a one-GPU node share it over gloo; a launcher that names neither local
    # rank nor local size (one process per node) gives the node's one GPU to its one process.
    assert plan_world(node, "auto", 32, "auto", one_gpu) == (World(11, 16, 3), "cuda:0", "gloo")
    assert plan_world(dict(WORLD_SIZE="2", RANK="1"), "auto", 32, "auto", one_gpu) == (World(1, 2, 0), "cuda:0", "nccl")
    # One process keeps what it was given, checked later (resolve_device): no launcher, no plan.
    assert plan_world({}, "cuda:7", 33, "auto", no_cuda) == (World(), "cuda:7", "auto")
    refusals = {("cuda", 32, "auto", no_cuda): "--device cuda: CUDA is not usable in this process",
                ("cuda:8", 32, "auto", eight_gpus): "--device cuda:8: this process sees 8 GPU(s)",
                ("auto", 24, "auto", eight_gpus): "--batch-size 24 does not divide among 16 processes",
                ("auto", 32, "nccl", one_gpu): "--dist-backend nccl: 8 processes share 1 GPU(s) on this node",
                ("auto", 32, "nccl", no_cuda): "--dist-backend nccl needs CUDA"}
    for (device, batch, backend, cuda), message in refusals.items():
        with pytest.raises(ValueError) as error:
            plan_world(node, device, batch, backend, cuda)
        assert str(error.value).startswith(message), (device, batch, backend, cuda)


def test_a_named_gpu_must_be_one_the_process_sees():
    from feedback_alignment.distributed import CudaSeen, check_device_usable
    for device in ("cpu", "auto"):
        check_device_usable(device, CudaSeen(False, 0))  # nothing asked of CUDA
    check_device_usable("cuda", CudaSeen(True, 1)), check_device_usable("cuda:1", CudaSeen(True, 2))
    with pytest.raises(ValueError) as error:
        check_device_usable("cuda:2", CudaSeen(True, 2))
    assert str(error.value) == "--device cuda:2: this process sees 2 GPU(s)"
    with pytest.raises(ValueError) as error:
        check_device_usable("cuda:0", CudaSeen(False, 0))
    assert str(error.value).startswith("--device cuda:0: CUDA is not usable in this process")
    # Without a value: what this process sees, the same as torch's own answer.
    assert CudaSeen.here() == CudaSeen(torch.cuda.is_available(), torch.cuda.device_count())
