"""Outputs are written atomically: a write that fails or is killed midway leaves the previous
file as it was (checkpoints, results and tables are replaced, never half-written)."""
import signal
import subprocess
import sys
import time

import pytest

from feedback_alignment.provenance import write_csv


class HalfWritten:
    """A table whose writing fails after the first bytes."""

    def to_csv(self, path, index=False):
        with open(path, "w") as handle:
            handle.write("epoch,test_error\n1,")
            raise OSError("disk full")


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,test_error\n1,5.0\n")
    with pytest.raises(OSError, match="disk full"):
        write_csv(path, HalfWritten())
    assert path.read_text() == "epoch,test_error\n1,5.0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


WRITER = """
import sys, torch
from feedback_alignment.provenance import torch_save
big = {"model": torch.ones(60_000_000)}  # 240 MB: long enough to be killed while writing
print("writing", flush=True)
torch_save(sys.argv[1], big)
"""


@pytest.mark.slow
def test_a_write_killed_midway_leaves_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the previous checkpoint")
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    deadline = time.time() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"the previous checkpoint"
