import contextlib
import copy
import fcntl
import functools
import hashlib
import http.server
import importlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import feedback_alignment as fa
import feedback_alignment.__main__

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores, and so do the processes its
    tests start (OMP_NUM_THREADS): workers that each ran on every core would oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject): a worker per core and one more. The SLURM test's worker spends most
    of its minute waiting for the scheduler's status checks (tests/test_slurm.py), and with a
    worker per core one core idled meanwhile: on 2 cores the suite took 3 min 57 s with 2 workers
    and 3 min 36 s with 3 (TESTING.md). PYTEST_XDIST_AUTO_NUM_WORKERS still decides where set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own hook reads it
    return len(os.sched_getaffinity(0)) + 1


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the longest of them (slow(seconds=...), measured on 2 cores) first of
    all: pytest-xdist hands tests out one at a time (pyproject's --maxschedchunk 1) to the worker
    that has finished one, so the longest run side by side and the short ones fill in around them
    (a long test started last would run alone at the end)."""
    def expected_seconds(item):
        mark = item.get_closest_marker("slow")
        return 0 if mark is None else mark.kwargs.get("seconds", 5)
    items.sort(key=expected_seconds, reverse=True)


def computed_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that build(folder) fills once per test session, whichever pytest-xdist worker asks
    first; the others wait for it and use it. (A module-scoped fixture alone runs once per worker
    that runs one of its tests.) Returns the folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    folder = root / f"computed-once-{name}"
    with open(root / f"computed-once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():  # (a build that failed is tried again)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder


def exit_status(exit_: SystemExit) -> int:
    """The process's exit status for this SystemExit, as the interpreter makes it: a message
    (printed to stderr) is 1, None is 0."""
    return 1 if isinstance(exit_.code, str) else (exit_.code or 0)


def _checked(process: subprocess.CompletedProcess, args, check: bool) -> subprocess.CompletedProcess:
    if check and process.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    return process


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real Snakemake on this repository's Snakefile with `workdir` as working directory."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    return _checked(subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout), args, check)


def place_prepared_data(tmp_path_factory, workdir: Path, config: dict, dataset: str = "digits") -> None:
    """The file the study's prepare job would write for `dataset` (the prepare command with the
    flags the study gives it, run once per test session), put where the workflow looks for it, so
    that Snakemake finds it up to date: for the Snakemake tests whose subject is not the data
    (SLURM's round trips, torchrun's launch), about 4 s of a core each. The studies of
    test_workflow prepare their own."""
    from feedback_alignment.study import Study

    study = Study(copy.deepcopy(config))
    flags = shlex.split(study.prepare_flags(dataset))
    name = "prepared-" + hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    target = workdir / study.data_file(dataset)
    folder = computed_once(tmp_path_factory, name, lambda out: cli_ok("prepare", "--out", str(out / target.name), *flags))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / target.name, target)


def snakemake_here(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`snakemake`, the same command line through Snakemake's own CLI entry point, run in this
    process, without the 3 to 4 s of a process's start and of torch's import that the Snakefile's
    parse needs: for what runs no job (plans, --lint, --report, configs Snakemake must refuse) and
    for single jobs whose subject is their command line (a mirror's flags, torchrun's launch);
    the jobs themselves are processes, as always. The studies run `python -m snakemake` as a
    process (`snakemake`), as the README's command does. Put back afterwards: the working
    directory, sys.path (Snakemake adds the workflow's folders) and SIGTERM's handler (its
    scheduler's)."""
    from snakemake.cli import main

    argv = ["--snakefile", str(REPO / "Snakefile"), *args]
    stdout, stderr = io.StringIO(), io.StringIO()
    path, sigterm = list(sys.path), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.chdir(workdir), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(argv)
        returncode = 0  # (main always exits)
    except SystemExit as exit_:
        returncode = exit_status(exit_)
    finally:
        sys.path[:] = path
        signal.signal(signal.SIGTERM, sigterm)
    return _checked(subprocess.CompletedProcess(["snakemake", *argv], returncode, stdout.getvalue(),
                                                stderr.getvalue()), args, check)


# A study small enough to train in seconds: two blocks (bp; usf raw and matched), two seeds.
TINY = dict(
    experiment="tiny",
    datasets={"digits": {}},
    archs={"net": {"arch": "convnet", "depth": 2, "width": 4}},
    training={"epochs": 2, "batch_size": 32, "lr": 0.05, "max_batches": 3, "alignment_every": 2},
    variants={"exact": {}, "raw": {"scale": "none"}, "matched": {"scale": "match"}},
    grid=[{"datasets": ["digits"], "archs": ["net"], "rules": ["bp"], "variants": ["exact"]},
          {"datasets": ["digits"], "archs": ["net"], "rules": ["usf"], "variants": ["raw", "matched"]}],
    seeds=[0, 1],
)


@pytest.fixture
def repo() -> Path:
    return REPO


# Rules whose B has W's shape and carries the error from layer to layer (all but dfa), and
# rules that take the feedback scale techniques (not learned B, not dfa).
LAYER_RULES = tuple(r for r in fa.RULES if fa.get_rule(r).signal == "layer")
SCALABLE_RULES = tuple(r for r in fa.RULES if fa.get_rule(r).scalable)
FEEDBACK_RULES = tuple(r for r in fa.RULES if fa.get_rule(r).write_feedback is not None)  # every rule but bp


def scale_for(rule: str, wanted: str = "match") -> str:
    """The feedback scale a test asks for, or 'none' for a rule that takes none."""
    return wanted if fa.get_rule(rule).scalable else "none"


def assert_matches_plain_layer(reference, layer, x, **extra):
    """A converted conv layer against the plain one it came from: the same output, weight and bias
    gradients, and as input gradient torch's own backward of the plain layer carrying B in W's
    place. Returns (input gradient, plain input gradient, the output gradient used)."""
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = reference(x_ref, **extra), layer(x_new, **extra)
    assert torch.equal(out_ref, out_new)
    grad_output = torch.randn_like(out_ref)
    out_ref.backward(grad_output)
    out_new.backward(grad_output)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)
    if reference.bias is not None:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-12, atol=1e-12)
    through_b = copy.deepcopy(reference)
    with torch.no_grad():
        through_b.weight.copy_(layer.feedback_weight)
    x_b = x.clone().requires_grad_()
    through_b(x_b, **extra).backward(grad_output)
    torch.testing.assert_close(x_new.grad, x_b.grad, rtol=1e-12, atol=1e-12)
    return x_new.grad, x_ref.grad, grad_output


@pytest.fixture
def float64():
    """Exact comparisons in double precision (use with pytest.mark.usefixtures)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def cli(command: str, *argv: str) -> tuple[int, str]:
    """`python -m feedback_alignment COMMAND ARGV...` run in this process, as (exit status, stderr).

    The same main() the process runs, and the exit the interpreter would make of it (sys.exit with
    a message: the message on stderr, status 1), without a process start and torch's import; an
    uncaught exception propagates (a process would print its traceback). What a command changes in
    the process is put back: torch's thread count and random state, the SIGTERM/SIGUSR1 handlers
    train installs."""
    module = importlib.import_module(f"feedback_alignment.{fa.__main__.MODULES.get(command, command)}")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            module.main(list(argv))
        status = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            stderr.write(exit_.code + "\n")
        status = exit_status(exit_)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return status, stderr.getvalue()


def cli_ok(command: str, *argv: str) -> str:
    """`cli`, for a command that must succeed: its stderr (the failure's end if it does not)."""
    status, stderr = cli(command, *argv)
    assert status == 0, stderr[-3000:]
    return stderr


def train_digits(tmp_path: Path, *flags: str) -> dict:
    """Prepare the digits data, run the train command with `flags` (in this process), return its
    result.json."""
    from feedback_alignment import data
    data.prepare_digits(tmp_path / "digits.pt")
    out = tmp_path / "run"
    cli_ok("train", "--dataset", "digits", "--data", str(tmp_path / "digits.pt"), "--out", str(out), *flags)
    return json.loads((out / "result.json").read_text())


def _switch_fused_kernel(monkeypatch, enabled: bool) -> None:
    from feedback_alignment import native

    monkeypatch.setenv("FEEDBACK_ALIGNMENT_NATIVE", "1" if enabled else "0")
    native.reset()
    if enabled and native.library() is None:
        compiler = os.environ.get("CC", "cc")
        if shutil.which(compiler) is None:
            pytest.skip(f"no C compiler ({compiler}) to build the fused kernel")
        pytest.fail(f"the fused kernel did not build with {compiler}")


@pytest.fixture(params=[True, False], ids=["fused-kernel", "pytorch-ops"])
def fused_kernel(request, monkeypatch):
    """Runs a test with native.py's fused CPU kernel and again with PyTorch operations only."""
    from feedback_alignment import native

    _switch_fused_kernel(monkeypatch, request.param)
    yield request.param
    native.reset()


@pytest.fixture
def kernel(monkeypatch):
    """The fused CPU kernel, built (or found in the cache) and switched on."""
    from feedback_alignment import native

    _switch_fused_kernel(monkeypatch, True)
    yield native.library()
    native.reset()


@pytest.fixture
def loopback_server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1 (an OS-chosen port)."""
    served = tmp_path / "served"
    served.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda *args: None  # a client that reads only the headers (a redirect check)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
