"""The fused CPU kernel against PyTorch's own operations and float64 sums, and how it is built."""
import copy
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import feedback_alignment as fa
from feedback_alignment import native
from feedback_alignment.models import build_model

# Sizes around every boundary the kernel has: its 8-wide vectors, the 256-entry float sums, the
# 4096-entry sub-blocks, the 65536-entry blocks that threads split (two blocks or more run in
# parallel), in several blocks per thread.
SIZES = (1, 7, 8, 13, 255, 257, 4095, 4096 + 3, 2 * 65536 + 5, (1 << 20) + 4 * 65536 + 11)


def weight_with_zeros(size, seed=0):
    weight = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    weight[::5] = 0.0  # B must be exactly 0 there
    if size > 3:
        weight[1], weight[2] = -0.0, float("nan")  # torch.sign gives 0 for both
    return weight


def float64_squares(tensor):
    finite = torch.nan_to_num(tensor.double(), nan=0.0)
    return (finite * finite).sum().item()


@pytest.mark.parametrize("size", SIZES)
def test_sign_times_magnitude_equals_torch(kernel, size):
    weight = weight_with_zeros(size)
    magnitude = torch.rand(size, generator=torch.Generator().manual_seed(1))
    for given, expected in ((None, torch.sign(weight)), (magnitude, torch.sign(weight) * magnitude)):
        feedback = torch.full((size,), 7.0)
        norms = native.signed_feedback_(feedback, weight, given)
        assert torch.equal(feedback, expected)
        assert norms.feedback == pytest.approx(float64_squares(expected), rel=1e-6, abs=1e-30)
        # ||W||^2 of a W with a NaN is NaN (as torch's is); checked on W without it
        nan_free = weight.nan_to_num(0.0)
        assert native.signed_feedback_(feedback, nan_free, given).weight == pytest.approx(
            float64_squares(nan_free), rel=1e-6)


def splitmix64_levels(key, count):
    """The 16-bit levels (lowest bits first) of SplitMix64 seeded with `key`, its published
    definition in numpy's wrapping uint64 arithmetic."""
    state = np.uint64(key) + np.arange(1, (count + 3) // 4 + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))).astype("<u8").view("<u2")[:count]


@pytest.mark.parametrize("size", SIZES)
def test_signed_levels_are_splitmix64_words_read_as_16_bit_levels(kernel, size):
    # Independent reference: the draw's words, split by hand into four 16-bit levels each,
    # (2k + 1) * step with the sign of W.
    weight = weight_with_zeros(size, seed=2).nan_to_num(0.0)
    step = np.float32(0.37 / 2**17)
    key = 0xC0FFEE0123456789
    magnitudes = (2 * splitmix64_levels(key, size).astype(np.float32) + 1) * step
    expected = torch.sign(weight) * torch.from_numpy(magnitudes)
    feedback = torch.empty(size)
    norms = native.signed_feedback_(feedback, weight, key=key, step=float(step))
    assert torch.equal(feedback, expected)
    assert norms.feedback == pytest.approx(float64_squares(expected), rel=1e-6, abs=1e-30)
    assert norms.weight == pytest.approx(float64_squares(weight), rel=1e-6)


def test_results_do_not_depend_on_the_thread_count(kernel):
    size = (1 << 20) + 9 * 65536 + 3
    weight = weight_with_zeros(size).nan_to_num(0.0)
    results = {}
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            feedback = torch.empty(size)
            norms = native.signed_feedback_(feedback, weight, key=12345, step=1e-3)
            words = native.random_words_(torch.empty(size // 4, dtype=torch.int64), 12345, first=7)
            results[threads] = feedback, norms, words
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3):
        assert torch.equal(results[threads][0], results[1][0])
        assert results[threads][1] == results[1][1]  # the same sums to the last bit
        assert torch.equal(results[threads][2], results[1][2])


def test_the_baseline_build_agrees_with_the_vector_clone_to_the_bit(kernel, monkeypatch, tmp_path):
    # On x86-64 each function has an AVX2 clone, picked on CPUs that have AVX2 (this one: so the
    # tests above ran it), and a baseline one for the others: built alone here, the same values.
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_CACHE", str(tmp_path))
    baseline = native.load(extra_flags=("-DFA_BASELINE_ONLY",))
    size = 3 * 65536 + 4099
    weight = weight_with_zeros(size, seed=5).nan_to_num(0.0)
    magnitude = torch.rand(size)
    for arguments in (dict(), dict(magnitude=magnitude), dict(key=2**64 - 5, step=1e-4)):
        default, reference = torch.empty(size), torch.empty(size)
        norms = native.signed_feedback_(default, weight, **arguments)
        assert native.signed_feedback_(reference, weight, **arguments, kernel=baseline) == norms
        assert torch.equal(default, reference)


@pytest.mark.parametrize("rule", ["usf", "brsf", "frsf"])
def test_converted_model_gets_the_same_feedback_with_and_without_the_kernel(rule, monkeypatch):
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    images = torch.randn(2, 3, 32, 32)
    outcome = {}
    for enabled in (True, False):
        monkeypatch.setenv("FEEDBACK_ALIGNMENT_NATIVE", "1" if enabled else "0")
        native.reset()
        model = fa.convert(copy.deepcopy(base), rule=rule, scale="match", seed=4).train()
        for _ in range(2):
            model(images)
        outcome[enabled] = {name: (layer.feedback_direction.clone(), layer.feedback_gain.item())
                            for name, layer in model.named_modules() if hasattr(layer, "feedback_gain")}
    native.reset()
    for name, (direction, gain) in outcome[True].items():
        assert torch.equal(direction, outcome[False][name][0]), name
        # float64 sums in the kernel, float32 dot products without it
        assert gain == pytest.approx(outcome[False][name][1], rel=1e-5), name


def test_a_bad_setting_of_the_switch_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_NATIVE", "maybe")
    native.reset()
    for _ in range(2):  # refused again, not silently taken as "off" the second time
        with pytest.raises(ValueError, match=r"^FEEDBACK_ALIGNMENT_NATIVE='maybe': set it to 1 .* or 0 "):
            native.library()
    native.reset()


def test_without_a_compiler_a_warning_and_the_same_values(monkeypatch, tmp_path):
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_NATIVE", "1")
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.reset()
    weight = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="fused CPU kernel is not available"):
        assert not native.takes(torch.empty(3, 4), weight)
    layer = fa.convert(torch.nn.Sequential(torch.nn.Linear(4, 3)), rule="usf", scale="match")[0]
    layer.train()(torch.randn(2, 4))
    assert torch.equal(layer.feedback_direction, torch.sign(layer.weight.detach()))
    native.reset()


@pytest.mark.slow
def test_the_kernel_is_built_once_into_the_cache(kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("FEEDBACK_ALIGNMENT_CACHE", str(tmp_path))
    native.reset()
    built = native.library()._name
    assert [path.name for path in tmp_path.iterdir()] == [built.split("/")[-1]]
    modified = (tmp_path / built.split("/")[-1]).stat().st_mtime_ns
    # Another process finds it there and loads it as is.
    code = "from feedback_alignment import native; print(native.library()._name)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == built and (tmp_path / built.split("/")[-1]).stat().st_mtime_ns == modified
    native.reset()


@pytest.mark.slow
def test_it_shares_torchs_openmp_runtime(kernel):
    # A second OpenMP runtime would bring its own threads, which compete with torch's for the
    # cores. In a fresh process (other packages bring their own runtimes): loading the kernel
    # maps no OpenMP library that torch had not mapped already.
    code = """if True:
        import json
        import torch
        from feedback_alignment import native
        def runtimes():
            with open("/proc/self/maps") as maps:
                return {line.split()[-1] for line in maps if "omp" in line.split()[-1]}
        before = runtimes()
        assert native.library() is not None
        print(json.dumps([sorted(before), sorted(runtimes())]))
    """
    before, after = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout)
    assert before and after == before


def test_the_words_kernel_refuses_a_tensor_it_cannot_fill(kernel):
    with pytest.raises(ValueError, match="contiguous int64 CPU tensor, not torch.float32 on cpu"):
        native.random_words_(torch.empty(10), 1)


def test_the_kernel_stays_out_of_torch_compile_and_other_tensors(kernel):
    weight = torch.randn(4, 4)
    assert native.takes(torch.empty(4, 4), weight)
    assert not native.takes(torch.empty(4, 4, dtype=torch.float64), weight.double())
    assert not native.takes(torch.empty(4, 4).t(), weight)
    assert not native.takes(torch.empty(4, 4), weight, torch.rand(4, 1))
    assert not native.takes(torch.empty(0, 4), torch.empty(0, 4))  # nothing to write: the PyTorch path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback under tracing must not warn either

        @torch.compile(backend="eager", fullgraph=True)
        def traced(w):
            return native.takes(torch.empty_like(w), w)
        assert traced(weight) is False


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("rule", ["usf", "brsf", "frsf"])
def test_a_layer_without_weights_refreshes_without_error(rule, fused_kernel):
    layer = fa.convert(torch.nn.Sequential(torch.nn.Linear(0, 3)), rule=rule, scale="match")[0]
    assert layer.train()(torch.randn(2, 0)).shape == (2, 3)
    assert layer.feedback_direction.shape == (3, 0) and layer.feedback_gain.item() == 0.0
