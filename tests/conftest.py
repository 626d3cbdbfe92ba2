import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real Snakemake on this repository's Snakefile with `workdir` as working directory."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    process = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and process.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    return process


@pytest.fixture
def repo() -> Path:
    return REPO
