"""Runs survive kills and preemption; a checkpoint of another config is refused; divergence is a result."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

from conftest import cli, cli_ok, computed_once
from feedback_alignment import data, figures, summarize

RUN_FLAGS = ["--arch", "convnet", "--depth", "3", "--width", "8", "--rule", "brsf", "--scale", "match",
             "--epochs", "5", "--batch-size", "16", "--lr", "0.05", "--lr-milestones", "3",
             "--flip", "--pad", "1", "--threads", "1", "--device", "cpu", "--seed", "3"]
COMPARED = ["epoch", "train_loss", "train_error", "val_error", "test_error", "lr"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.pt"
    data.prepare_digits(path)
    return path


def train_flags(digits, out, *extra):
    return ["--dataset", "digits", "--data", str(digits), "--out", str(out), *RUN_FLAGS, *extra]


def train_command(digits, out, *extra):
    return [sys.executable, "-m", "feedback_alignment", "train", *train_flags(digits, out, *extra)]


def interrupt_after_first_epoch(command, out, signum, extra_wait=0.0):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(extra_wait)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def interrupt_here_after_first_epoch(argv, out, signum=signal.SIGTERM, extra_wait=0.05):
    """The train command run in this process (`cli`) and sent `signum` once its first epoch's
    checkpoint exists, as interrupt_after_first_epoch sends it to a process: for the tests of what
    a resume restores, without a process's start. (The signal's path through a real process,
    its exit status and message are the tests above.) A signal that arrives after the run has
    ended finds this test's no-op handler, which `cli` puts back, and the run counts as not
    interrupted. Returns (exit status, stderr)."""
    finished = threading.Event()

    def send():
        while not (out / "checkpoint.pt").exists():
            if finished.wait(0.005):
                return
        time.sleep(extra_wait)
        os.kill(os.getpid(), signum)

    previous = signal.signal(signum, lambda *_: None)
    watcher = threading.Thread(target=send)
    watcher.start()
    try:
        return cli("train", *argv)
    finally:
        finished.set()
        watcher.join()
        signal.signal(signum, previous)


def assert_same_run(resumed, straight):
    a, b = pd.read_csv(resumed / "history.csv"), pd.read_csv(straight / "history.csv")
    pd.testing.assert_frame_equal(a[COMPARED], b[COMPARED], check_exact=True)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (resumed, straight))
    for key in ("final_train_loss", "final_val_error", "final_test_error", "best_epoch", "best_val_error"):
        assert ra[key] == rb[key], key
    wa, wb = (torch.load(d / "best.pt", weights_only=True)["model"] for d in (resumed, straight))
    for key in wb:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def straight_run(digits, tmp_path_factory):
    return computed_once(tmp_path_factory, "straight-run", lambda out: cli_ok("train", *train_flags(digits, out)))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted(digits, straight_run, tmp_path):
    out = tmp_path / "run"
    returncode, _ = interrupt_after_first_epoch(train_command(digits, out), out, signal.SIGKILL, 0.05)
    assert returncode == -signal.SIGKILL
    assert not (out / "result.json").exists()
    assert "resuming from" in cli_ok("train", *train_flags(digits, out))
    assert_same_run(out, straight_run)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])  # preemption; SLURM's time-limit warning
def test_a_stop_signal_checkpoints_mid_epoch_and_resumes_exactly(signum, digits, straight_run, tmp_path):
    out = tmp_path / "run"
    returncode, stderr = interrupt_after_first_epoch(train_command(digits, out), out, signum, 0.05)
    assert returncode == 1
    assert f"train: {signal.Signals(signum).name} at epoch" in stderr and "rerun to resume" in stderr
    assert "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state"]
    assert state["batches"] is not None and state["batches"]["next"] > 0  # mid-epoch
    cli_ok("train", *train_flags(digits, out))
    assert_same_run(out, straight_run)


@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused(digits, tmp_path):
    out = tmp_path / "run"
    cli_ok("train", *train_flags(digits, out, "--epochs", "1"))
    before = (out / "checkpoint.pt").read_bytes()
    status, stderr = cli("train", *train_flags(digits, out, "--epochs", "1", "--lr", "0.01"))
    assert status == 1
    assert "different config (lr: 0.05 there, 0.01 now)" in stderr
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_divergence_is_a_result_through_summary_and_figures(digits, tmp_path):
    runs = tmp_path / "runs"
    diverging = runs / "usf-raw"
    fine = runs / "bp"
    base = ["--arch", "convnet", "--depth", "6", "--width", "16", "--no-batch-norm", "--epochs", "3",
            "--threads", "1", "--device", "cpu", "--lr", "0.5", "--batch-size", "32"]
    command = ["train", "--dataset", "digits", "--data", str(digits)]
    cli_ok(*command, *base, "--rule", "usf", "--scale", "none", "--variant", "raw", "--out", str(diverging))
    cli_ok(*command, *base[:-4], "--lr", "0.01", "--batch-size", "32", "--rule", "bp", "--out", str(fine),
           "--epochs", "1")
    result = json.loads((diverging / "result.json").read_text())
    assert result["status"] == "diverged" and result["diverged_at_epoch"] == 1
    assert result["diverged_at_step"] >= 1 and result["best_epoch"] is None
    for run in (diverging, fine):
        cli_ok("evaluate", "--run", str(run))
    evaluation = json.loads((diverging / "evaluation.json").read_text())
    assert evaluation["status"] == "diverged" and evaluation["test_error_top1"] is None
    summarize.main(["--runs", str(runs), "--out", str(tmp_path)])
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("rule")
    assert summary.loc["usf", "n_diverged"] == 1 and summary.loc["bp", "n_diverged"] == 0
    figures.main(["--results", str(tmp_path), "--out", str(tmp_path / "figures")])
    assert (tmp_path / "figures" / "final_error.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--data", "/no/such/digits.pt"], "train: prepared dataset '/no/such/digits.pt' not found"),
    (["--arch", "nonet"], "train: unknown arch 'nonet'"),
    (["--exclude", "clasifier"], "train: exclude names 'clasifier'"),
    (["--crop", "40"], "train: --crop 40 is larger than the padded digits images"),
    (["--rule", "kp"], "train: rule 'kp' takes scale 'none', not 'match': its B is learned"),
    (["--runs-per-gpu", "0"], "train: --runs-per-gpu 0 must be at least 1"),
    (["--rule-option", "lr"], "train: --rule-option 'lr': write KEY=VALUE"),
    (["--rule", "wm", "--scale", "none", "--rule-option", "rate=1"],
     "train: rule 'wm' has no option 'rate'; it takes lr, decay, batch, every, budget"),
    (["--batch-size", "5000"], "train: no training batch: the digits training split is smaller than "
                               "--batch-size 5000"),
])
def test_cli_user_errors_are_one_line_without_traceback(digits, tmp_path, extra, message):
    # In this process (an exception other than the one-line exit would fail the test here, as a
    # process would print its traceback); test_a_refused_process_* checks the process's own exit.
    out = tmp_path / "run"
    status, stderr = cli("train", *train_flags(digits, out, *extra))  # later flags win
    assert status == 1
    assert stderr.strip().splitlines()[-1].startswith(message), stderr[-500:]
    assert not out.exists()  # a refused run leaves nothing behind, not even its folder


def test_a_refused_process_exits_1_with_one_line_and_no_traceback(digits, tmp_path):
    out = tmp_path / "run"
    process = subprocess.run(train_command(digits, out) + ["--arch", "nonet"], capture_output=True, text=True,
                             timeout=120)
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 1 and len(lines) == 1 and lines[0].startswith("train: unknown arch 'nonet'")
    assert not out.exists()


def test_evaluate_and_summarize_user_errors(tmp_path):
    for command, message in (
            (["evaluate", "--run", str(tmp_path / "none")], "evaluate: "),
            (["summarize", "--runs", str(tmp_path), "--out", str(tmp_path)], "summarize: no evaluation.json"),
            (["figures", "--results", str(tmp_path), "--out", str(tmp_path)], "figures: ")):
        status, stderr = cli(*command)
        assert status == 1 and stderr.startswith(message) and stderr.count("\n") == 1, stderr[-500:]


def test_checkpoint_of_another_code_version_is_refused(tmp_path):
    from feedback_alignment import checkpoint
    from feedback_alignment.provenance import git_sha

    config = {"rule": "fa", "lr": 0.1, "out": "here"}
    current = dict(format=checkpoint.FORMAT, config=checkpoint.semantic_config(config), git_sha=git_sha())
    checkpoint.check_checkpoint(current, {**config, "out": "elsewhere", "threads": 4}, tmp_path / "c.pt")  # placement only
    if git_sha() == "unknown":
        pytest.skip("not running from a git checkout")
    with pytest.raises(checkpoint.CheckpointMismatch, match="written by code version 0123abc"):
        checkpoint.check_checkpoint({**current, "git_sha": "0123abc"}, config, tmp_path / "c.pt")


@pytest.mark.slow
def test_a_checkpoint_of_the_old_format_is_refused_naming_the_change(digits, tmp_path):
    """A checkpoint written before TrainState (format 1: no 'format' key, the state a plain dict)
    is refused in one line that says what changed, and the run's files stay as they were."""
    out = tmp_path / "run"
    status, stderr = interrupt_here_after_first_epoch(train_flags(digits, out), out, extra_wait=0)
    assert status == 1, stderr[-2000:]
    path = out / "checkpoint.pt"
    old = torch.load(path, weights_only=True)
    del old["format"]
    torch.save(old, path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, stderr = cli("train", *train_flags(digits, out))
    assert status == 1
    assert stderr.strip().splitlines()[-1] == (
        f"train: {path} has checkpoint format 1, this code reads format 2 (the training state became the "
        "TrainState record (checkpoints of format 1 have no 'format' key)); delete it to start over")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("rule, options", [("dfa", ()), ("kp", ()), ("wm", ()),
                                           ("ia", ("--rule-option", "gamma_start=0.5"))])
@pytest.mark.slow
def test_learned_and_direct_feedback_resume_exactly(rule, options, digits, tmp_path):
    # dfa's lazily drawn B, kp's and ia's B in the optimizer state, wm's B and its noise stream
    # position; ia's gamma turns on in the second of three epochs, after the resume.
    flags = ("--rule", rule, "--scale", "none", "--epochs", "3", "--lr-milestones", "2", *options)
    straight, out = tmp_path / "straight", tmp_path / "run"
    cli_ok("train", *train_flags(digits, straight, *flags))
    status, stderr = interrupt_here_after_first_epoch(train_flags(digits, out, *flags), out)
    assert status == 1 and "train: SIGTERM at epoch" in stderr, stderr[-2000:]
    cli_ok("train", *train_flags(digits, out, *flags))
    assert_same_run(out, straight)


def test_checkpoints_load_to_the_cpu_so_rng_states_restore_on_any_device(digits, tmp_path):
    """On a GPU the old resume path loaded the RNG states onto the device, where set_rng_state
    refuses them: every tensor of a loaded checkpoint must be on the CPU, whatever the run's device."""
    from feedback_alignment.checkpoint import load_checkpoint, rng_states, set_rng_states
    out = tmp_path / "run"
    status, stderr = interrupt_here_after_first_epoch(train_flags(digits, out), out, extra_wait=0)
    assert status == 1, stderr[-2000:]
    checkpoint = load_checkpoint(out / "checkpoint.pt")

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    devices = {t.device.type for t in tensors(checkpoint)}
    assert devices == {"cpu"}
    set_rng_states(checkpoint["rng"], torch.device("cpu"))
    assert torch.equal(rng_states(torch.device("cpu"))["torch"], checkpoint["rng"]["torch"])


def test_a_resumed_run_continues_the_random_stream_dropout_draws_from(tmp_path):
    """torchvision's VGG, AlexNet and MobileNets draw their dropout masks from torch's global
    generator: resume must put back the state the checkpoint saved. (The runs above pass without
    it: their models and data draw from generators of their own.)"""
    from feedback_alignment.checkpoint import TrainState, resume, save_checkpoint

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    config, path, x = {"seed": 0}, tmp_path / "checkpoint.pt", torch.ones(16, 8)
    model, optimizer = fresh()
    model(x).sum().backward()
    optimizer.step()
    save_checkpoint(path, config, model, optimizer, torch.device("cpu"), TrainState())
    following = model(x)  # the next step's output: a mask drawn from the saved state
    resumed, resumed_optimizer = fresh()
    torch.manual_seed(1)  # a new process's generator is elsewhere
    resume(path, config, resumed, resumed_optimizer, torch.device("cpu"))
    assert torch.equal(resumed(x), following)
