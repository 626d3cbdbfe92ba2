"""The random streams (draws.py) against SplitMix64 written here from its published definition,
on every path that makes them: torch operations (what a GPU runs, here on CPU tensors), the
fused CPU kernel, and many layers' draws at once."""
import hashlib

import numpy as np
import pytest
import torch
from torch import nn

import feedback_alignment as fa
from feedback_alignment import draws, native, refresh
from feedback_alignment.layers import refresh_ahead_of_forward

MASK = 2**64 - 1


def splitmix64(seed, count):
    """Steele, Lea & Flood's SplitMix64, as its reference C code steps it."""
    state, out = seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return out


def unsigned(tensor):
    return [value & MASK for value in tensor.tolist()]


def levels_of(words):
    """Four 16-bit levels per word, lowest bits first."""
    return [(word >> shift) & 0xFFFF for word in words for shift in (0, 16, 32, 48)]


def test_the_reference_gives_splitmix64s_published_outputs():
    assert splitmix64(1234567, 5) == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                      4593380528125082431, 16408922859458223821]


@pytest.fixture(params=["torch", "kernel"])
def word_path(request, monkeypatch):
    """Words made by torch operations (a GPU's path) or by the fused CPU kernel."""
    if request.param == "kernel":
        monkeypatch.setenv("FEEDBACK_ALIGNMENT_NATIVE", "1")
        native.reset()
        if native.library() is None:
            pytest.skip("the fused CPU kernel cannot be built here")
        kernel_words = draws.words  # bound now: a test may put a path in draws.words' place
        yield lambda key, count, first=0: kernel_words(key, count, torch.device("cpu"), first)
    else:
        yield lambda key, count, first=0: draws.torch_words(key, count, torch.device("cpu"), first)
    native.reset()


@pytest.mark.parametrize("first, count", [(0, 5), (0, 2 * 65536 + 5), (1000, 17)])
def test_words_on_every_path_are_splitmix64(word_path, first, count):
    key = 0xDEADBEEF12345678
    assert unsigned(word_path(key, count, first)) == splitmix64(key, first + count)[first:]


def test_a_layers_stream_is_keyed_by_its_seed_and_name_and_a_draw_by_its_index():
    key = int.from_bytes(hashlib.sha256(b"3\0features.0").digest()[:8], "little")
    assert draws.layer_key(3, "features.0") == key
    for draw in (0, 1, 7):
        assert draws.draw_key(key, draw) == splitmix64(key, draw + 1)[draw]
    # The same keys computed on tensors, where a GPU keeps the counters.
    keys = draws.draw_keys(torch.tensor([draws.as_int64(key)] * 3), torch.tensor([0, 1, 7]))
    assert unsigned(keys) == [draws.draw_key(key, draw) for draw in (0, 1, 7)]


def test_a_per_step_draw_is_its_words_read_as_16_bit_levels(word_path, monkeypatch):
    monkeypatch.setattr(draws, "words", lambda key, count, device, first=0: word_path(key, count, first))
    key, size = 987654321, 4 * 1000 + 3
    values = draws.fast_uniform_(torch.empty(size, dtype=torch.float64), -1.0, 3.0, key)
    levels = torch.tensor(levels_of(splitmix64(key, (size + 3) // 4))[:size], dtype=torch.float64)
    assert torch.equal(values, -1.0 + (levels + 0.5) * (4.0 / 2**16))


@pytest.mark.parametrize("dtype, bits", [(torch.float32, 24), (torch.float64, 53)])
def test_a_draw_made_once_takes_each_words_top_bits(dtype, bits):
    key, size = 42, 1001
    values = draws.uniform_(torch.empty(size, dtype=dtype), -0.5, 1.5, key)
    top = np.array([word >> (64 - bits) for word in splitmix64(key, size)], dtype=np.float64) / 2.0**bits
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    expected = top.astype(numpy_dtype) * numpy_dtype(2.0) + numpy_dtype(-0.5)  # float arithmetic as torch's
    assert np.array_equal(values.numpy(), expected)


def test_a_draw_does_not_depend_on_how_it_is_cut_or_on_the_thread_count(monkeypatch):
    whole = draws.uniform_(torch.empty(10_000), -1.0, 1.0, 5)
    monkeypatch.setattr(draws, "PIECE", 999)
    assert torch.equal(draws.uniform_(torch.empty(10_000), -1.0, 1.0, 5), whole)
    previous = torch.get_num_threads()
    values = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            values[threads] = draws.fast_uniform_(torch.empty(3 * 65536 + 7), 0.0, 3.0, 5)
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(values[1], values[2])


WORDS = 1 << 20  # 4 M levels: a lane's mean is known to about 1e-3 of its range


def test_every_16_bit_lane_of_the_words_is_uniform(word_path):
    lanes = word_path(12345, WORDS).view(torch.uint16).to(torch.int32).view(-1, 4).double() / (1 << 16)
    top_bit = (lanes >= 0.5).double().mean(0)
    assert torch.allclose(top_bit, torch.full((4,), 0.5, dtype=torch.float64), atol=0.005), top_bit
    assert torch.allclose(lanes.mean(0), torch.full((4,), 0.5, dtype=torch.float64), atol=0.003), lanes.mean(0)
    # each lane's 16 top-4-bit buckets equally full (chi-square, 15 degrees of freedom, p ~ 1e-6)
    buckets = (lanes * 16).floor().long()
    for lane in range(4):
        counts = torch.bincount(buckets[:, lane], minlength=16).double()
        assert ((counts - WORDS / 16) ** 2 / (WORDS / 16)).sum() < 50, (lane, counts)


def test_many_draws_at_once_equal_each_draw_alone():
    sizes = (1, 5, 8, 13, 4097)
    keys = [draws.draw_key(draws.layer_key(0, f"layer{index}"), index) for index in range(len(sizes))]
    plan = draws.StreamPlan(list(sizes), torch.device("cpu"))
    together = plan.levels(torch.tensor([draws.as_int64(key) for key in keys]), torch.float64)
    for size, key, levels in zip(sizes, keys, together):
        assert levels.tolist() == levels_of(splitmix64(key, (size + 3) // 4))[:size]


def test_the_per_step_levels_are_uniform_at_every_output_position():
    # brsf's magnitudes through the many-layer path, as a GPU makes them: a layer's entries at
    # positions 0, 1, 2, 3 mod 4 come from the four lanes of a word.
    plan = draws.StreamPlan([4 * WORDS], torch.device("cpu"))
    levels = plan.levels(torch.tensor([draws.as_int64(draws.draw_key(7, 0))]), torch.float64)[0]
    positions = levels.view(-1, 4) / (1 << 16)
    assert torch.allclose(positions.mean(0), torch.full((4,), 0.5, dtype=torch.float64), atol=0.003)
    above = (positions >= 0.5).double().mean(0)
    assert torch.allclose(above, torch.full((4,), 0.5, dtype=torch.float64), atol=0.005), above


def _model(rule, constrain=False, channels_last=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.Conv2d(40, 300, 3), nn.Conv2d(300, 2, 1), nn.Flatten(),
                          nn.Linear(8, 5))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return fa.convert(model, rule=rule, scale="match", seed=3, constrain_weight_norm=constrain)


@pytest.mark.parametrize("rule", ["fa", "usf", "brsf", "frsf"])
def test_a_models_refresh_together_equals_each_layer_alone(rule, fused_kernel):
    together, alone = _model(rule, constrain=True), _model(rule, constrain=True)
    for model in (together, alone):
        for parameter in model.parameters():
            parameter.data.mul_(1.5)  # W moved: the constraint and the gain have work to do
    refresh_ahead_of_forward(together, ())
    for _, layer in fa.feedback_layers(alone):
        layer.refresh_feedback_()
    for (_, a), (_, b) in zip(fa.feedback_layers(together), fa.feedback_layers(alone)):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=0)
        assert torch.equal(a.feedback_direction, b.feedback_direction)
        torch.testing.assert_close(a.feedback_gain, b.feedback_gain, rtol=1e-6, atol=0)
        assert int(a.feedback_draws) == int(b.feedback_draws) == int(a._draw_count)


def test_layers_of_different_kinds_in_one_model_are_refreshed_each_by_its_own_rule(fused_kernel):
    """Parts converted apart (usf with a matched gain, brsf without, frsf under the weight-norm
    constraint) in one model: the model's refresh groups layers by kind, and each is refreshed
    as it would be alone."""
    def parts():
        torch.manual_seed(0)
        return [fa.convert(nn.Sequential(nn.Conv2d(3, 40, 3), nn.Conv2d(40, 30, 3)), rule=rule, scale=scale, seed=3,
                           constrain_weight_norm=constrain)
                for rule, scale, constrain in (("usf", "match", False), ("brsf", "none", False), ("frsf", "match", True))]
    together, alone = nn.Sequential(*parts()), parts()
    for model in (together, *alone):
        for parameter in model.parameters():
            parameter.data.mul_(1.5)
    refresh_ahead_of_forward(together, ())
    for part in alone:
        refresh_ahead_of_forward(part, ())
    layers = [layer for part in alone for _, layer in fa.feedback_layers(part)]
    assert len(layers) == len(fa.feedback_layers(together)) == 6
    for (name, a), b in zip(fa.feedback_layers(together), layers):
        assert a.rule.name == b.rule.name and torch.equal(a.weight, b.weight), name
        assert torch.equal(a.feedback_direction, b.feedback_direction), name
        assert torch.equal(a.feedback_gain, b.feedback_gain) and int(a.feedback_draws) == int(b.feedback_draws), name


@pytest.mark.parametrize("channels_last", [False, True])
def test_brsfs_b_is_the_layers_next_levels_times_the_sign_of_w(channels_last, fused_kernel):
    # B = sign(W) (2k + 1) bound / 2^17 with k the levels of the layer's next draw, from the
    # reference; on the fused kernel's path and the torch path (a GPU's), channels_last or not.
    model = _model("brsf", channels_last=channels_last)
    layer = model[1]
    weight = layer.weight.detach()
    weight[0, :, 0, 0] = 0.0
    key = draws.draw_key(layer.stream_key, layer._draw_count)
    refresh_ahead_of_forward(model, ())
    levels = levels_of(splitmix64(key, (weight.numel() + 3) // 4))[:weight.numel()]
    step = np.float32(layer.init_bound / 2**17)
    magnitudes = torch.from_numpy((2 * np.array(levels, dtype=np.float32) + 1) * step).view(weight.shape)
    assert torch.equal(layer.feedback_direction, magnitudes * torch.sign(weight))
    assert (layer.feedback_direction[0, :, 0, 0] == 0).all()


def test_a_signed_draw_made_once_is_the_full_precision_draw_times_the_sign():
    # The path a rule that draws its signed magnitudes once would take (no built-in rule does).
    layer = fa.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), rule="frsf", seed=2)[0]
    weight = layer.weight.detach().clone()
    weight[0, 0] = 0.0
    draw = int(layer.feedback_draws)
    signed = torch.empty_like(weight)
    assert refresh.LayerDraws([layer], per_step=False).uniform_times_sign_([signed], [0.5], [weight]) is None
    key = draws.draw_key(draws.layer_key(2, "0"), draw)
    expected = draws.uniform_(torch.empty_like(weight), 0.0, 0.5, key) * torch.sign(weight)
    assert torch.equal(signed, expected) and int(layer.feedback_draws) == draw + 1
    assert (signed[0, 0] == 0).all()


def test_a_per_step_draw_from_zero_and_into_a_channels_last_tensor(word_path, monkeypatch):
    monkeypatch.setattr(draws, "words", lambda key, count, device, first=0: word_path(key, count, first))
    key = 24680
    values = draws.fast_uniform_(torch.empty(2, 3, 4, 5, dtype=torch.float64), 0.0, 3.0, key)
    levels = torch.tensor(levels_of(splitmix64(key, 30))[:120], dtype=torch.float64).view(2, 3, 4, 5)
    assert torch.equal(values, (levels + 0.5) * (3.0 / 2**16))  # low 0: the midpoints of the levels
    # A channels_last buffer gets the same values at the same (logical) indices.
    strided = torch.empty(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    filled = draws.fast_uniform_(strided, 0.0, 3.0, key)
    assert filled is strided and not strided.is_contiguous() and torch.equal(strided, values)
    shifted = draws.fast_uniform_(torch.empty(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last),
                                  -1.0, 2.0, key)
    assert torch.equal(shifted, values - 1.0)
