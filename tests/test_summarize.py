"""summarize's tables, every column, from runs written by hand (no training), against values
worked out by hand: means and spreads over seeds, diverged seeds counted, paired differences
against backprop with their t intervals (one degree of freedom: Student's t is Cauchy's, so
the quantile and p-value have closed forms), the published numbers, the tuning tables."""
import csv
import json
import math
from importlib import resources

import pandas as pd
import pytest
from conftest import cli, cli_ok

# (folder, dataset, arch, arch_label, depth, rule, variant, seed, status, top1, top5, selected)
RUNS = [
    ("a/bp-0", "digits", "convnet", None, 6, "bp", "default", 0, "completed", 10.0, 1.0, None),
    ("a/bp-1", "digits", "convnet", None, 6, "bp", "default", 1, "completed", 12.0, 2.0, None),
    ("a/bp-2", "digits", "convnet", None, 6, "bp", "default", 2, "completed", 14.0, 3.0, None),
    ("b/bpraw-0", "digits", "convnet", None, 6, "bp", "raw", 0, "completed", 11.0, None, None),
    ("b/bpraw-1", "digits", "convnet", None, 6, "bp", "raw", 1, "completed", 11.0, None, None),
    ("c/usf-0", "digits", "convnet", None, 6, "usf", "default", 0, "completed", 20.0, 4.0, "lr=0.05"),
    ("c/usf-1", "digits", "convnet", None, 6, "usf", "default", 1, "completed", 23.0, None, "lr=0.05"),
    ("c/usf-2", "digits", "convnet", None, 6, "usf", "default", 2, "diverged", None, None, "lr=0.05"),
    ("d/usfraw-0", "digits", "convnet", None, 6, "usf", "raw", 0, "completed", 21.0, None, None),
    ("d/usfraw-1", "digits", "convnet", None, 6, "usf", "raw", 1, "completed", 25.0, None, None),
    ("e/fa-0", "digits", "convnet", None, 6, "fa", "default", 0, "completed", 15.0, None, None),
    ("e/fa-1", "digits", "convnet", None, 6, "fa", "default", 1, "completed", 17.0, None, None),
    ("f/frsf-0", "digits", "convnet", None, 6, "frsf", "default", 0, "completed", 10.0, None, None),
    ("f/frsf-1", "digits", "convnet", None, 6, "frsf", "default", 1, "completed", 12.0, None, None),
    ("g/brsf-nobn-0", "digits", "convnet", None, 6, "brsf", "nobn", 0, "completed", 19.0, None, None),
    ("g/dfa-0", "digits", "convnet", None, 6, "dfa", "default", 0, "diverged", None, None, None),  # all diverged
    ("h/c10-0", "c10", "lenet_cifar", "small", 6, "usf", "init", 0, "completed", 15.0, None, None),
    ("h/c10-1", "c10", "lenet_cifar", "small", 6, "usf", "init", 1, "completed", 17.0, None, None),
    ("h/c10-frsf-0", "c10", "lenet_cifar", "small", 6, "frsf", "init", 0, "completed", 18.0, None, None),
]
KEYS = ["dataset", "arch", "rule", "variant"]


def write_run(folder, dataset, arch, arch_label, depth, rule, variant, seed, status, top1, top5, selected):
    folder.mkdir(parents=True)
    config = dict(dataset=dataset, arch=arch, arch_label=arch_label, depth=depth, rule=rule, seed=seed)
    if variant != "default":  # a config without a variant is the default one
        config["variant"] = variant
    if selected:
        config["selected"] = selected
    evaluation = dict(status=status, best_epoch=None if top1 is None else 3, test_error_top1=top1,
                      config=config)
    if top5 is not None:
        evaluation["test_error_top5"] = top5
    if dataset == "c10":
        evaluation["dataset_kind"] = "cifar10"
    (folder / "evaluation.json").write_text(json.dumps(evaluation))


@pytest.fixture
def results(tmp_path):
    runs = tmp_path / "runs"
    for folder, *fields in RUNS:
        write_run(runs / folder, *fields)
    # Histories and measurements: two runs have them; empty files (a run stopped before its
    # first epoch) are skipped; alignment.csv's own rule column gives way to the run's labels.
    (runs / "a/bp-0/history.csv").write_text("epoch,train_loss,val_error\n1,2.0,50.0\n2,1.0,30.0\n")
    (runs / "c/usf-2/history.csv").write_text("epoch,train_loss,val_error\n1,9.0,90.0\n")
    (runs / "c/usf-1/history.csv").write_text("")
    (runs / "e/fa-0/history.csv").write_text("epoch,train_loss,val_error\n")
    (runs / "e/fa-0/alignment.csv").write_text("step,layer,rule,angle\n20,conv1,fa,80.0\n40,conv1,fa,70.0\n")
    (runs / "e/fa-1/alignment.csv").write_text("")
    tuning = tmp_path / "tuning"
    tuning.mkdir()
    selections = []
    for name, group, table in (
            ("usf", dict(dataset="digits", arch="convnet", rule="usf", variant="default"),
             [dict(point="lr=0.05,rule_options.decay=0.0001", n_seeds=2, val_error_mean=9.0, val_error_std=1.0,
                   selected=True),
              dict(point="lr=0.5,rule_options.decay=0.0001", n_seeds=2, val_error_mean=None, val_error_std=None,
                   selected=False)]),
            ("fa", dict(dataset="digits", arch="convnet", rule="fa", variant="default"),
             [dict(point="scale=match", n_seeds=1, val_error_mean=8.0, val_error_std=None, selected=True)])):
        path = tuning / f"{name}.json"
        path.write_text(json.dumps(dict(group=group, point=table[0]["point"], table=table)))
        selections.append(str(path))
    out = tmp_path / "results"
    # One run named by its file, the others found below their folders.
    cli_ok("summarize", "--runs", str(runs / "a"), str(runs / "b/bpraw-0/evaluation.json"), str(runs / "b/bpraw-1"),
           *(str(runs / letter) for letter in "cdefgh"), "--out", str(out), "--tuning", *selections)
    return out


def read(results, name, index=None):
    frame = pd.read_csv(results / name)
    return frame.set_index(index) if index else frame


def test_runs_csv_has_one_row_per_run_with_its_labels_and_numbers(results):
    runs = read(results, "runs.csv")
    assert list(runs.columns) == ["dataset", "arch", "rule", "variant", "seed", "kind", "model", "depth", "selected",
                                  "status", "best_epoch", "test_error_top1", "test_error_top5"]
    assert len(runs) == len(RUNS)
    for (_, row), (_, dataset, arch, label, depth, rule, variant, seed, status, top1, top5, selected) in zip(
            runs.iterrows(), RUNS):
        assert (row.dataset, row.arch, row.rule, row.variant, row.seed) == (dataset, label or arch, rule, variant, seed)
        assert row.kind == ("cifar10" if dataset == "c10" else dataset) and row.model == arch
        assert row.depth == depth if arch == "convnet" else math.isnan(row.depth)  # depth: convnets only
        assert row.selected == selected if selected else math.isnan(row.selected)
        assert row.status == status
        assert row.best_epoch == 3 if top1 is not None else math.isnan(row.best_epoch)
        assert row.test_error_top1 == top1 if top1 is not None else math.isnan(row.test_error_top1)
        assert row.test_error_top5 == top5 if top5 is not None else math.isnan(row.test_error_top5)


def test_summary_has_mean_spread_and_counts_per_group(results):
    summary = read(results, "summary.csv")
    assert list(summary.columns) == [*KEYS, "n_seeds", "n_diverged", "test_error_mean", "test_error_std",
                                     "test_error_min", "test_error_max", "test_error_top5_mean",
                                     "test_error_top5_std", "kind", "model", "depth", "selected"]
    # Groups in the order their first run was read.
    assert [tuple(row) for row in summary[KEYS].itertuples(index=False)] == [
        ("digits", "convnet", "bp", "default"), ("digits", "convnet", "bp", "raw"),
        ("digits", "convnet", "usf", "default"), ("digits", "convnet", "usf", "raw"),
        ("digits", "convnet", "fa", "default"), ("digits", "convnet", "frsf", "default"),
        ("digits", "convnet", "brsf", "nobn"), ("digits", "convnet", "dfa", "default"), ("c10", "small", "usf", "init"),
        ("c10", "small", "frsf", "init")]
    nan = float("nan")
    # n_seeds, n_diverged, mean, std (ddof 1), min, max, top-5 mean, top-5 std, selected
    expected = {
        ("bp", "default"): (3, 0, 12.0, 2.0, 10.0, 14.0, 2.0, 1.0, nan),
        ("bp", "raw"): (2, 0, 11.0, 0.0, 11.0, 11.0, nan, nan, nan),
        ("usf", "default"): (3, 1, 21.5, math.sqrt(4.5), 20.0, 23.0, 4.0, nan, "lr=0.05"),
        ("usf", "raw"): (2, 0, 23.0, math.sqrt(8.0), 21.0, 25.0, nan, nan, nan),
        ("fa", "default"): (2, 0, 16.0, math.sqrt(2.0), 15.0, 17.0, nan, nan, nan),
        ("frsf", "default"): (2, 0, 11.0, math.sqrt(2.0), 10.0, 12.0, nan, nan, nan),
        ("brsf", "nobn"): (1, 0, 19.0, nan, 19.0, 19.0, nan, nan, nan),
        ("dfa", "default"): (1, 1, nan, nan, nan, nan, nan, nan, nan),
        ("usf", "init"): (2, 0, 16.0, math.sqrt(2.0), 15.0, 17.0, nan, nan, nan),
        ("frsf", "init"): (1, 0, 18.0, nan, 18.0, 18.0, nan, nan, nan),
    }
    columns = ["n_seeds", "n_diverged", "test_error_mean", "test_error_std", "test_error_min", "test_error_max",
               "test_error_top5_mean", "test_error_top5_std", "selected"]
    for _, row in summary.iterrows():
        for column, value in zip(columns, expected[row.rule, row.variant]):
            assert_same(row[column], value, (row.rule, row.variant, column))
        assert row.kind == ("cifar10" if row.dataset == "c10" else "digits")
        assert row.model == ("lenet_cifar" if row.dataset == "c10" else "convnet")
        assert row.depth == 6 if row.model == "convnet" else math.isnan(row.depth)
    assert summary.n_seeds.dtype == summary.n_diverged.dtype == "int64"  # counts, not 3.0


def test_paired_differences_against_backprop_of_the_same_variant_or_else_the_first(results):
    comparisons = read(results, "comparisons.csv")
    assert list(comparisons.columns) == ["dataset", "arch", "rule", "variant", "baseline_variant", "n_pairs",
                                         "diff_mean", "ci_low", "ci_high", "p_value"]
    # With one degree of freedom Student's t is the Cauchy distribution: its 97.5% quantile is
    # tan(0.475 pi) and the two-sided p-value of t is (2/pi) atan(1/|t|).
    quantile = math.tan(0.475 * math.pi)
    nan = float("nan")
    # usf/default against bp/default over seeds 0 and 1 (seed 2 diverged): differences 10, 11.
    sem = math.sqrt(0.5) / math.sqrt(2)
    usf_default = (10.5, 10.5 - quantile * sem, 10.5 + quantile * sem, 2 / math.pi * math.atan(sem / 10.5))
    # usf/raw against bp/raw (same variant): differences 10, 14.
    sem_raw = math.sqrt(8.0) / math.sqrt(2)
    usf_raw = (12.0, 12.0 - quantile * sem_raw, 12.0 + quantile * sem_raw, 2 / math.pi * math.atan(sem_raw / 12.0))
    expected = {  # baseline, n_pairs, mean, low, high, p
        ("usf", "default"): ("default", 2, *usf_default),
        ("usf", "raw"): ("raw", 2, *usf_raw),
        ("fa", "default"): ("default", 2, 5.0, 5.0, 5.0, 0.0),  # every pair differs by 5
        ("frsf", "default"): ("default", 2, 0.0, 0.0, 0.0, 1.0),  # every pair the same
        ("brsf", "nobn"): ("default", 1, 9.0, nan, nan, nan),  # no bp/nobn: bp's first variant; one pair
    }
    # In the order the groups were read; no bp rows, none for c10 (no backprop there).
    assert list(zip(comparisons.rule, comparisons.variant)) == list(expected)
    for _, row in comparisons.iterrows():
        assert (row.dataset, row.arch) == ("digits", "convnet")
        for column, value in zip(["baseline_variant", "n_pairs", "diff_mean", "ci_low", "ci_high", "p_value"],
                                 expected[row.rule, row.variant]):
            assert_same(row[column], value, (row.rule, row.variant, column))


def test_published_numbers_and_ours_beside_them(results):
    with resources.files("feedback_alignment").joinpath("resources/references.csv").open() as handle:
        shipped = list(csv.DictReader(handle))
    references = read(results, "references.csv")
    assert list(references.columns) == ["dataset", "arch", "rule", "test_error_top1", "source"]
    assert len(references) == len(shipped)
    for (_, row), line in zip(references.iterrows(), shipped):
        assert [row.dataset, row.arch, row.rule, row.source] == [line[k] for k in ("dataset", "arch", "rule", "source")]
        assert row.test_error_top1 == float(line["test_error_top1"])
    compared = read(results, "vs_reference.csv")
    assert list(compared.columns) == ["dataset", "arch", "rule", "variant", "ours", "test_error_mean",
                                      "test_error_std", "n_seeds", "n_diverged", "reference_error", "difference",
                                      "source"]
    # digits has no published number; c10's LeNet usf and frsf have (one seed: no spread, shown as 0)
    assert list(zip(compared.rule, compared.variant, compared.ours)) == [
        ("usf", "init", "16.00 +- 1.41 (n=2)"), ("frsf", "init", "18.00 +- 0.00 (n=1)")]
    row = compared.iloc[0]
    published = next(line for line in shipped if (line["dataset"], line["arch"], line["rule"]) ==
                     ("cifar10", "lenet_cifar", "usf"))
    assert (row.dataset, row.arch, row.rule, row.variant) == ("c10", "small", "usf", "init")
    assert row.test_error_mean == 16.0 and row.test_error_std == pytest.approx(math.sqrt(2.0))
    assert (row.n_seeds, row.n_diverged) == (2, 0)
    assert row.reference_error == float(published["test_error_top1"]) == 16.22
    assert row.difference == pytest.approx(16.0 - 16.22)
    assert row.source == published["source"]
    assert compared.iloc[1].reference_error == 16.86 and math.isnan(compared.iloc[1].test_error_std)


def test_histories_and_measurements_carry_their_runs_labels(results):
    history = read(results, "histories.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_error", *KEYS, "seed", "status"]
    assert history.values.tolist() == [
        [1, 2.0, 50.0, "digits", "convnet", "bp", "default", 0, "completed"],
        [2, 1.0, 30.0, "digits", "convnet", "bp", "default", 0, "completed"],
        [1, 9.0, 90.0, "digits", "convnet", "usf", "default", 2, "diverged"]]
    alignment = read(results, "alignment.csv")
    # For a notebook: load_runs' frames are indexed 0..n-1 (not each run's own rows 0, 1, ...).
    from feedback_alignment.summarize import load_runs
    for frame in load_runs([results.parent / "runs"]):
        assert frame.index.tolist() == list(range(len(frame)))
    assert list(alignment.columns) == ["step", "layer", "angle", *KEYS, "seed"]
    assert alignment.values.tolist() == [[20, "conv1", 80.0, "digits", "convnet", "fa", "default", 0],
                                         [40, "conv1", 70.0, "digits", "convnet", "fa", "default", 0]]


def test_tuning_table_has_one_column_per_swept_key(results):
    tuning = read(results, "tuning.csv")
    assert list(tuning.columns) == [*KEYS, "lr", "rule_options.decay", "n_seeds", "val_error_mean", "val_error_std",
                                    "selected", "scale"]
    nan = float("nan")
    expected = [
        ["digits", "convnet", "usf", "default", 0.05, 0.0001, 2, 9.0, 1.0, True, nan],
        ["digits", "convnet", "usf", "default", 0.5, 0.0001, 2, nan, nan, False, nan],
        ["digits", "convnet", "fa", "default", nan, nan, 1, 8.0, nan, True, "match"],  # text stays text
    ]
    assert len(tuning) == len(expected)
    for (_, row), values in zip(tuning.iterrows(), expected):
        for column, value in zip(tuning.columns, values):
            assert_same(row[column], value, column)


def test_the_tuning_table_of_several_groups_is_indexed_0_to_n(results):
    from feedback_alignment.summarize import tuning_table

    table = tuning_table(sorted((results.parent / "tuning").glob("*.json")))
    assert table.index.tolist() == [0, 1, 2] and table.rule.tolist() == ["fa", "usf", "usf"]


def test_a_run_without_history_or_tuning_gives_empty_tables_with_their_columns(tmp_path):
    write_run(tmp_path / "runs/bp", "digits", "convnet", None, 6, "bp", "default", 0, "completed", 10.0, None, None)
    cli_ok("summarize", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    for name in ("histories.csv", "alignment.csv"):
        assert (tmp_path / "out" / name).read_text().strip() == ""
    assert pd.read_csv(tmp_path / "out/comparisons.csv").empty
    # 10 classes: no top-5 error, so no top-5 columns
    assert "test_error_top5_mean" not in pd.read_csv(tmp_path / "out/summary.csv").columns
    tuning = pd.read_csv(tmp_path / "out/tuning.csv")
    assert tuning.empty and list(tuning.columns) == [*KEYS, "n_seeds", "val_error_mean", "val_error_std", "selected"]


def test_no_evaluation_found_is_one_line_naming_where_it_looked(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    status, stderr = cli("summarize", "--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path))
    assert (status, stderr.strip()) == (1, f"summarize: no evaluation.json in {tmp_path / 'a'}, {tmp_path / 'b'}")
    assert not list(tmp_path.glob("*.csv"))  # nothing written


def test_backprop_is_the_same_variant_else_its_first_and_a_rule_without_pairs_has_none():
    from feedback_alignment.summarize import compare_to_backprop

    runs = pd.DataFrame([dict(dataset="d", arch="a", rule=rule, variant=variant, seed=seed, test_error_top1=error)
                         for rule, variant, seed, error in (("bp", "first", 0, 10.0), ("bp", "second", 0, 20.0),
                                                            ("fa", "other", 0, 13.0), ("fa", "unpaired", 5, 1.0))])
    rows = compare_to_backprop(runs).set_index("variant")
    assert rows.loc["other", "baseline_variant"] == "first" and rows.loc["other", "diff_mean"] == 3.0
    assert rows.loc["unpaired", "n_pairs"] == 0 and math.isnan(rows.loc["unpaired", "diff_mean"])


def test_the_command_line_help_and_its_required_arguments(capsys):
    from feedback_alignment import summarize

    status, _ = cli("summarize", "--help")
    out = capsys.readouterr().out
    assert status == 0
    assert " ".join(out.split()).startswith(
        "usage: python -m feedback_alignment summarize [-h] --runs RUNS [RUNS ...] --out OUT [--tuning [TUNING ...]]")
    assert summarize.__doc__.strip() in out  # as written: the example line keeps its indent
    assert " ".join(out.split()).endswith(
        "--runs RUNS [RUNS ...] evaluation.json files, or folders searched for them "
        "--out OUT folder for summary.csv, runs.csv and histories.csv "
        "--tuning [TUNING ...] selected.json of each tuned group")
    for missing, argv in (("--runs", ["--out", "x"]), ("--out", ["--runs", "x"])):
        status, stderr = cli("summarize", *argv)
        assert status == 2 and stderr.strip().endswith(f"error: the following arguments are required: {missing}")


def assert_same(actual, expected, where):
    if isinstance(expected, float) and math.isnan(expected):
        assert pd.isna(actual), (where, actual)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12), (where, actual, expected)
    else:
        assert actual == expected, (where, actual, expected)
