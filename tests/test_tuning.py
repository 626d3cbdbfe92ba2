"""Tuning: selection on validation error, paired comparisons against backprop, and the two-stage
workflow (tuning runs, then the study's seeds at the selected point, reusing matching runs)."""
import json
import math

import pandas as pd
import pytest

from conftest import TINY, snakemake
from feedback_alignment.summarize import compare_to_backprop
from feedback_alignment.tuning import tuning_table


def test_selection_is_the_point_of_lowest_mean_validation_error():
    scores = pd.DataFrame(dict(point=["lr=0.1", "lr=0.1", "lr=0.05", "lr=0.05", "lr=0.02", "lr=0.02"],
                               seed=[0, 1, 0, 1, 0, 1], val_error=[10.0, 14.0, 11.0, 12.0, 13.0, 9.0]))
    table = tuning_table(scores)
    assert list(table.point) == ["lr=0.1", "lr=0.05", "lr=0.02"]  # the sweep's order
    assert list(table.val_error_mean) == [12.0, 11.5, 11.0]
    assert table.val_error_std.tolist() == pytest.approx([math.sqrt(8), math.sqrt(0.5), math.sqrt(8)])
    assert list(table.selected) == [False, False, True] and list(table.n_seeds) == [2, 2, 2]


def test_of_equal_means_the_first_point_is_selected_and_a_diverged_seed_disqualifies():
    scores = pd.DataFrame(dict(point=["a=1", "a=2", "a=3"], seed=[0, 0, 0], val_error=[5.0, 5.0, 1.0]))
    assert list(tuning_table(scores).selected) == [False, False, True]
    scores.loc[2, "val_error"] = float("nan")  # diverged before its first evaluation
    assert list(tuning_table(scores).selected) == [True, False, False]


def t3_cdf(t):
    """Student's t distribution with 3 degrees of freedom, in closed form."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_paired_differences_against_backprop_by_hand():
    bp = [20.0, 22.0, 18.0, 25.0]
    fa = [21.0, 24.0, 21.0, 31.0]  # differences 1, 2, 3, 6: mean 3, sample sd sqrt(14/3)
    other = [30.0, 30.0, 30.0]  # seed 3 missing: three pairs
    runs = pd.DataFrame(
        [dict(dataset="d", arch="a", rule="bp", variant="exact", seed=s, test_error_top1=e) for s, e in enumerate(bp)]
        + [dict(dataset="d", arch="a", rule="fa", variant="raw", seed=s, test_error_top1=e) for s, e in enumerate(fa)]
        + [dict(dataset="d", arch="a", rule="usf", variant="raw", seed=s, test_error_top1=e)
           for s, e in enumerate(other)])
    rows = compare_to_backprop(runs).set_index("rule")
    fa_row = rows.loc["fa"]
    sem = math.sqrt(14 / 3) / 2
    t975 = 3.182446305284263  # t quantile, 3 degrees of freedom (printed tables: 3.182)
    assert t3_cdf(t975) == pytest.approx(0.975, abs=1e-12)
    assert (fa_row.n_pairs, fa_row.baseline_variant) == (4, "exact")
    assert fa_row.diff_mean == pytest.approx(3.0)
    assert (fa_row.ci_low, fa_row.ci_high) == pytest.approx((3 - t975 * sem, 3 + t975 * sem))
    assert fa_row.p_value == pytest.approx(2 * (1 - t3_cdf(3 / sem)))
    assert rows.loc["usf"].n_pairs == 3 and rows.loc["usf"].diff_mean == pytest.approx(10.0)
    assert "bp" not in rows.index


def test_one_pair_has_a_difference_but_no_interval():
    runs = pd.DataFrame([dict(dataset="d", arch="a", rule=r, variant="v", seed=0, test_error_top1=e)
                         for r, e in (("bp", 1.0), ("fa", 3.0))])
    row = compare_to_backprop(runs).iloc[0]
    assert row.n_pairs == 1 and row.diff_mean == 2.0 and math.isnan(row.ci_low) and math.isnan(row.p_value)


@pytest.mark.slow(seconds=65)
def test_a_tuned_study_selects_then_reuses_matching_tuning_runs_and_resumes(tmp_path):
    from test_workflow import write_config

    config = json.loads(json.dumps(TINY))
    config["grid"] = [{"datasets": ["digits"], "archs": ["net"], "rules": ["bp", "usf"], "variants": ["raw"]}]
    config["tuning"] = {"seeds": [0], "sweep": {"lr": [0.02, 0.2]}}
    write_config(tmp_path, config)
    results = tmp_path / "results" / "tiny"
    # A tuning stage stopped after one run continues where it stopped.
    first = results / "tuning/digits/net/bp-raw/lr=0.02/seed0/result.json"
    snakemake(tmp_path, "--cores", "2", str(first.relative_to(tmp_path)))
    stamp = first.stat().st_mtime_ns
    rest = snakemake(tmp_path, "--cores", "2")
    assert rest.stdout.count("rule train_tuning:") + rest.stderr.count("rule train_tuning:") == 3
    assert first.stat().st_mtime_ns == stamp
    tuning = pd.read_csv(results / "tuning.csv")
    assert list(tuning.columns) == ["dataset", "arch", "rule", "variant", "lr", "n_seeds", "val_error_mean",
                                    "val_error_std", "selected"]
    summary = pd.read_csv(results / "summary.csv").set_index("rule")
    for rule in ("bp", "usf"):
        rows = tuning[tuning.rule == rule]
        chosen = rows.loc[rows.val_error_mean.idxmin()]
        assert chosen.selected and rows.selected.sum() == 1
        assert summary.loc[rule, "selected"] == f"lr={chosen.lr}"
        run = results / "runs/digits/net" / f"{rule}-raw"
        reused, trained = (json.loads((run / f"seed{s}" / "result.json").read_text()) for s in (0, 1))
        # Seed 0 is the tuning run at the selected point (not trained again), seed 1 trains there.
        tuning_run = results / f"tuning/digits/net/{rule}-raw/lr={chosen.lr}/seed0"
        assert reused["reused_from"] == str(tuning_run.relative_to(tmp_path))
        assert not (run / "seed0" / "checkpoint.pt").exists() and (run / "seed1" / "checkpoint.pt").exists()
        assert reused["best_val_error"] == json.loads((tuning_run / "result.json").read_text())["best_val_error"]
        assert (run / "seed0" / "best.pt").read_bytes() == (tuning_run / "best.pt").read_bytes()
        assert trained["config"]["lr"] == chosen.lr and "reused_from" not in trained
    comparisons = pd.read_csv(results / "comparisons.csv")
    assert list(comparisons.rule) == ["usf"] and comparisons.n_pairs.iloc[0] == 2
    assert (results / "figures" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
