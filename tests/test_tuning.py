"""Tuning: selection on validation error and paired comparisons against backprop. The two-stage
workflow (tuning runs, then the study's seeds at the selected point, reusing matching runs) runs
in tests/test_workflow.py::test_a_tuned_study_end_to_end."""
import math

import pandas as pd
import pytest

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
