import subprocess
import sys
from pathlib import Path

import pytest

import feedback_alignment as fa

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


# Rules whose B has W's shape and carries the error from layer to layer (all but dfa), and
# rules that take the feedback scale techniques (not learned B, not dfa).
LAYER_RULES = tuple(r for r in fa.RULES if fa.get_rule(r).signal == "layer")
SCALABLE_RULES = tuple(r for r in fa.RULES if fa.get_rule(r).scalable)


def scale_for(rule: str, wanted: str = "match") -> str:
    """The feedback scale a test asks for, or 'none' for a rule that takes none."""
    return wanted if fa.get_rule(rule).scalable else "none"
