"""The benchmark's bookkeeping (it makes no speed claim here: BENCHMARKS.md does, from real runs)."""
import json

import pytest

from feedback_alignment import bench


def test_bench_times_every_variant_in_copies_and_writes_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "resnet20", "--rules", "fa", "wm", "aa:examples=1", "--rounds", "2", "--warmup", "1",
                "--batch-size", "2", "--copies", "2", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["plain", "plain2", "fa", "wm", "aa:examples=1"]
    for row in rows:
        assert row["copies"] == 2 and row["median_ms"] > 0 and row["images_per_s"] > 0
        assert 0.1 < row["ratio"] < 50, row
    printed = capsys.readouterr().out
    assert "2 rounds x 2 copies" in printed and "\n      wm " in printed


def test_bench_refuses_no_copies_or_no_rounds_in_one_line(capsys):
    for option in ("--copies", "--rounds", "--steps-per-sample"):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--models", "resnet20", option, "0"])
        assert exit_info.value.code == 2
        assert f"{option} must be at least 1, got 0" in capsys.readouterr().err


def test_a_sample_times_several_steps_between_two_synchronizations(monkeypatch, capsys):
    calls = []
    make_step = bench._make_step

    def counted(*args):
        step = make_step(*args)
        return lambda: (calls.append(1), step())
    monkeypatch.setattr(bench, "_make_step", counted)
    rows = bench.bench_model("resnet20", ["fa"], "match", rounds=2, warmup=1, batch_size=2,
                             device=bench.torch.device("cpu"), copies=1, steps_per_sample=3)
    # plain, plain2 and fa, one copy each: (1 warmup + 2 timed) samples of 3 steps
    assert len(calls) == 3 * 3 * 3 and len(rows) == 3


@pytest.mark.parametrize("spec, message", [
    ("xx", "--rules xx: unknown rule 'xx'"),
    ("aa:examples=-1", "--rules aa:examples=-1: rule 'aa' option 'examples' must be at least 0, not -1"),
    ("fa:examples=2", "--rules fa:examples=2: rule 'fa' has no option 'examples'"),
    ("aa:examples", "--rules aa:examples: 'examples': write KEY=VALUE"),
])
def test_bench_refuses_an_unknown_rule_or_option_in_one_line(spec, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--models", "resnet20", "--rules", spec])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
