"""The SLURM profile against a real SLURM: Debian's slurm-wlm and munge on this machine, started by
scripts/local_slurm.sh (one node, two fake GPUs, accounting off). A tiny digits study goes through
profiles/slurm as submitted jobs and ends with its summary."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO

SCRIPT = REPO / "scripts" / "local_slurm.sh"

STUDY = dict(
    experiment="tiny",
    datasets={"digits": {}},
    archs={"net": {"arch": "convnet", "depth": 2, "width": 4}},
    training={"epochs": 2, "batch_size": 32, "lr": 0.05, "max_batches": 3, "alignment_every": 2},
    variants={"matched": {"scale": "match"}},
    grid=[{"datasets": ["digits"], "archs": ["net"], "rules": ["usf"], "variants": ["matched"]}],
    seeds=[0, 1],
)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM for this module, or a skip that says why there is none."""
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found): scripts/local_slurm.sh install adds it")
    if os.getuid() != 0:
        pytest.skip("the local SLURM runs its daemons as root")
    # Not under pytest's tmp_path: munge refuses sockets below directories others can't enter.
    directory = Path(tempfile.mkdtemp(prefix="fa-slurm-", dir="/tmp"))
    started = subprocess.run(["bash", str(SCRIPT), "start", str(directory)], capture_output=True, text=True,
                             timeout=120)
    try:
        if started.returncode != 0 or "idle" not in started.stdout:
            pytest.skip(f"the SLURM daemons did not start: {(started.stdout + started.stderr).strip()[-500:]}")
        yield directory
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_study_runs_through_the_slurm_profile(slurm, tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(STUDY))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--workflow-profile", str(REPO / "profiles" / "slurm"), "--configfile", "config/config.yaml",
               # This SLURM keeps no accounts and no accounting (status from squeue).
               "--slurm-no-account", "--slurm-status-command", "squeue",
               "--slurm-init-seconds-before-status-checks", "1", "--jobs", "4"]
    process = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "SLURM_CONF": str(slurm / "slurm.conf")})
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    log = process.stdout + process.stderr
    # Training and evaluation went to SLURM as jobs; nothing asked for a GPU (the study has none).
    assert log.count("has been submitted with SLURM jobid") == 4, log[-3000:]
    assert "rule_train" in log and "rule_evaluate" in log
    summary = pd.read_csv(tmp_path / "results" / "tiny" / "summary.csv")
    assert list(summary["n_seeds"]) == [2] and summary["test_error_mean"].between(0, 100).all()
    for seed in (0, 1):
        run = tmp_path / "results/tiny/runs/digits/net/usf-matched" / f"seed{seed}"
        assert (run / "evaluation.json").is_file() and (run / "result.json").is_file()
