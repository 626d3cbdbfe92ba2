"""The SLURM profile against a real SLURM: Debian's slurm-wlm and munge on this machine, started by
scripts/local_slurm.sh (one node, two fake GPUs, accounting off). A tiny digits study goes through
profiles/slurm as submitted jobs and ends with its summary."""
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, cli_ok, place_prepared_data

SCRIPT = REPO / "scripts" / "local_slurm.sh"

STUDY = dict(
    experiment="tiny",
    datasets={"digits": {}},
    archs={"net": {"arch": "convnet", "depth": 2, "width": 4}},
    training={"epochs": 2, "batch_size": 32, "lr": 0.05, "max_batches": 3, "alignment_every": 2},
    variants={"matched": {"scale": "match"}},
    grid=[{"datasets": ["digits"], "archs": ["net"], "rules": ["usf"], "variants": ["matched"]}],
    seeds=[0],
)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM for this module, or a skip that says why there is none."""
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found): scripts/local_slurm.sh install adds it")
    if os.getuid() != 0:
        pytest.skip("the local SLURM runs its daemons as root")
    # One SLURM at a time (its daemons listen on fixed ports): a test of this module on another
    # pytest-xdist worker waits here until this one's daemons have stopped.
    with open("/tmp/fa-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Not under pytest's tmp_path: munge refuses sockets below directories others can't enter.
        directory = Path(tempfile.mkdtemp(prefix="fa-slurm-", dir="/tmp"))
        try:
            started = subprocess.run(["bash", str(SCRIPT), "start", str(directory)], capture_output=True,
                                     text=True, timeout=120)
            if started.returncode != 0 or "idle" not in started.stdout:
                pytest.skip(f"the SLURM daemons did not start: {(started.stdout + started.stderr).strip()[-500:]}")
            yield directory
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=60)
            shutil.rmtree(directory, ignore_errors=True)


def _running_jobs(env) -> dict[str, str]:
    """Running jobs by their comment, where the plugin writes the rule and its wildcards."""
    out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%k %i"], capture_output=True, text=True, timeout=30,
                         env=env)
    return dict(line.split() for line in out.stdout.splitlines())


@pytest.mark.slow(seconds=60)
def test_a_study_runs_through_the_slurm_profile_and_a_preempted_job_resumes(slurm, tmp_path, tmp_path_factory,
                                                                           monkeypatch):
    """The training job goes to SLURM and gets SIGUSR1, as the profile's time-limit warning sends
    it (a preemption's SIGTERM was checked the same way): the run checkpoints and fails,
    Snakemake's retry (the profile's `retries: 1`) resumes it as a second job, it ends with an
    uninterrupted run's metrics, and the study ends with its summary. (One seed: each SLURM round
    trip waits on the plugin's status checks, and a second seed's job, run through, made the first
    round last until it ended: about 30 s under the suite's load instead of the preempted job's 10.)"""
    training = {key: value for key, value in STUDY["training"].items() if key != "max_batches"}
    # 6 epochs of about 0.4 s: the signal, sent once the first epoch's checkpoint exists (looked
    # for every 0.05 s), finds the job training (the alignment probe every 10 steps, not 2: it was
    # most of the step's time). No longer: the resumed job takes 12 to 14 s here (20 under load),
    # most of it Snakemake's and Python's starts. The plugin checks the jobs' status N, 2N + 10 and
    # 3N + 30 s after submitting them (N: --slurm-init-seconds-before-status-checks) and again N s
    # after a check that saw one end: with N = 5, checks at 5, 20 and 45 s see a job end at 20
    # (with N = 1, at 1, 12 and 33 s, at 33: 26 s more per round trip, and the preemption makes two).
    study = dict(STUDY, training=dict(training, epochs=6, alignment_every=10))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(study))
    place_prepared_data(tmp_path_factory, tmp_path, study)  # (the data's preparation: test_workflow's studies)
    env = {**os.environ, "SLURM_CONF": str(slurm / "slurm.conf")}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--workflow-profile", str(REPO / "profiles" / "slurm"), "--configfile", "config/config.yaml",
               # This SLURM keeps no accounts and no accounting (status from squeue).
               "--slurm-no-account", "--slurm-status-command", "squeue",
               "--slurm-init-seconds-before-status-checks", "5", "--jobs", "4",
               # Up to the summary: the figures are a local job like the summary, drawn in test_workflow's studies.
               "results/tiny/summary.csv"]
    preempted = tmp_path / "results/tiny/runs/digits/net/usf-matched/seed0"
    workflow = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        deadline = time.time() + 300
        while not (preempted / "checkpoint.pt").exists():  # the first epoch is done: the job is training
            assert workflow.poll() is None and time.time() < deadline, "the training job never checkpointed"
            time.sleep(0.05)
        jobs = _running_jobs(env)
        job = jobs.get("rule_train_wildcards_digits_net_usf_matched_0")
        assert job is not None, jobs
        # USR1 to the job's steps, as the profile's --signal=USR1@300 sends it before the time limit.
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30, env=env)
        log, _ = workflow.communicate(timeout=900)
    finally:
        if workflow.poll() is None:
            workflow.kill()
    assert workflow.returncode == 0, log[-4000:]
    # Training (with its evaluation) went to SLURM as jobs: the run and its retry.
    assert log.count("has been submitted with SLURM jobid") == 2, log[-4000:]
    assert "rule_train" in log
    summary = pd.read_csv(tmp_path / "results" / "tiny" / "summary.csv")
    assert list(summary["n_seeds"]) == [1] and summary["test_error_mean"].between(0, 100).all()
    assert (preempted / "evaluation.json").is_file() and (preempted / "result.json").is_file()
    assert "resuming from" in (preempted / "train.log").read_text()
    # The same training, uninterrupted, straight through the CLI with the job's own command line.
    line = next(l for l in log.splitlines() if "feedback_alignment train " in l and "--seed 0 " in l)
    flags = line.split("feedback_alignment train ", 1)[1].split(" --out ")[0].split()
    reference = tmp_path / "reference"
    monkeypatch.chdir(tmp_path)  # the job's paths are relative to the workflow's directory
    cli_ok("train", *flags, "--out", str(reference))
    compared = ["epoch", "train_loss", "train_error", "val_error", "test_error", "lr"]
    resumed, uninterrupted = (pd.read_csv(d / "history.csv")[compared] for d in (preempted, reference))
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)
