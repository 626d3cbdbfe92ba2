import copy
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import feedback_alignment as fa

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real Snakemake on this repository's Snakefile with `workdir` as working directory."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    process = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and process.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    return process


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


def train_digits(tmp_path: Path, *flags: str) -> dict:
    """Prepare the digits data, run the real train CLI with `flags`, return its result.json."""
    from feedback_alignment import data
    data.prepare_digits(tmp_path / "digits.pt")
    out = tmp_path / "run"
    process = subprocess.run([sys.executable, "-m", "feedback_alignment", "train", "--dataset", "digits",
                              "--data", str(tmp_path / "digits.pt"), "--out", str(out), *flags],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
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
