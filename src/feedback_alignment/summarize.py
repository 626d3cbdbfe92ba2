"""Aggregate finished runs: one row per dataset x arch x rule x variant, mean and spread over seeds.

    python -m feedback_alignment summarize --runs results/demo/runs --out results/demo

Reads the given evaluation.json files (or every one below given folders) with the history.csv
and alignment.csv beside them; writes summary.csv (test error mean, std, n_seeds and n_diverged
per group), runs.csv (one row per run), histories.csv and alignment.csv (every epoch and every
measurement of every run, labelled) that the figures are drawn from, references.csv (the published
numbers we compare with, with sources) and vs_reference.csv (ours beside theirs where one exists).
Diverged runs are counted, not dropped.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import pandas as pd

from .provenance import write_csv
from .tuning import point_items

KEYS = ["dataset", "arch", "rule", "variant"]


def load_runs(sources: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rows, histories, alignments = [], [], []
    paths = []
    for source in sources:
        paths += sorted(source.rglob("evaluation.json")) if source.is_dir() else [source]
    for path in paths:
        evaluation = json.loads(path.read_text())
        config = evaluation["config"]
        labels = dict(dataset=config["dataset"], arch=config.get("arch_label") or config["arch"],
                      rule=config["rule"], variant=config.get("variant", "default"), seed=config["seed"])
        # What a published number is matched on: the dataset's kind and the model, not the
        # study's names for them (a study may call CIFAR-10 "c10" and LeNet "small").
        rows.append(dict(**labels, kind=evaluation.get("dataset_kind", config["dataset"]), model=config["arch"],
                         depth=config.get("depth") if config["arch"] == "convnet" else None,
                         selected=config.get("selected"),
                         status=evaluation["status"], best_epoch=evaluation["best_epoch"],
                         test_error_top1=evaluation["test_error_top1"],
                         test_error_top5=evaluation.get("test_error_top5")))
        history_path = path.parent / "history.csv"
        if history_path.is_file() and history_path.stat().st_size:
            history = pd.read_csv(history_path)
            if len(history):
                histories.append(history.assign(**labels, status=evaluation["status"]))
        alignment_path = path.parent / "alignment.csv"
        if alignment_path.is_file() and alignment_path.stat().st_size:
            alignments.append(pd.read_csv(alignment_path).drop(columns="rule").assign(**labels))
    if not rows:
        raise FileNotFoundError(f"no evaluation.json in {', '.join(map(str, sources))}")
    runs = pd.DataFrame(rows)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    alignment = pd.concat(alignments, ignore_index=True) if alignments else pd.DataFrame()
    return runs, history, alignment


def references() -> pd.DataFrame:
    """Published top-1 test errors (%), each with its source (paper, table, recipe, seeds), by
    dataset kind and model (not by the names a study gives them)."""
    with resources.files("feedback_alignment").joinpath("resources/references.csv").open() as handle:
        return pd.read_csv(handle)


def versus_reference(summary: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Ours (mean +- std over n seeds) beside the published number, where one exists."""
    published = reference.rename(columns={"dataset": "kind", "arch": "model", "test_error_top1": "reference_error"})
    merged = summary.merge(published, on=["kind", "model", "rule"], how="inner")
    merged["difference"] = merged["test_error_mean"] - merged["reference_error"]
    merged["ours"] = [f"{m:.2f} +- {s:.2f} (n={n})" for m, s, n in
                      zip(merged.test_error_mean, merged.test_error_std.fillna(0), merged.n_seeds)]
    return merged[["dataset", "arch", "rule", "variant", "ours", "test_error_mean", "test_error_std",
                   "n_seeds", "n_diverged", "reference_error", "difference", "source"]]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per group: seeds, diverged seeds, and test error mean/std (%) over the seeds that have one."""
    def aggregate(group: pd.DataFrame) -> pd.Series:
        # pandas makes the mean, min and max of no values NaN, and the std (ddof 1) of fewer than
        # two; every group gets every key, or pandas stacks the groups into one long series.
        top1, top5 = group["test_error_top1"].dropna(), group["test_error_top5"].dropna()
        return pd.Series(dict(n_seeds=len(group), n_diverged=int((group["status"] == "diverged").sum()),
                              test_error_mean=top1.mean(), test_error_std=top1.std(ddof=1),
                              test_error_min=top1.min(), test_error_max=top1.max(),
                              test_error_top5_mean=top5.mean(), test_error_top5_std=top5.std(ddof=1)))
    summary = runs.groupby(KEYS, sort=False, dropna=False).apply(aggregate, include_groups=False).reset_index()
    if summary["test_error_top5_mean"].isna().all():  # no run reports top-5: no such columns
        summary = summary.drop(columns=["test_error_top5_mean", "test_error_top5_std"])
    # The dataset's kind and the model (what published numbers are matched on), the depth of a
    # convnet, and the point of the sweep tuning selected (e.g. lr=0.05; empty untuned).
    labels = runs.groupby(KEYS, sort=False)[["kind", "model", "depth", "selected"]].first().reset_index()
    summary = summary.merge(labels, on=KEYS, how="left")
    summary[["n_seeds", "n_diverged"]] = summary[["n_seeds", "n_diverged"]].astype(int)
    return summary


def compare_to_backprop(runs: pd.DataFrame) -> pd.DataFrame:
    """Each rule's test error minus backprop's on the same dataset, arch and seed, paired over
    seeds: mean difference, its 95% t interval and the two-sided paired t-test's p-value (NaN
    with fewer than two pairs; where every pair differs by the same amount, the interval is that
    amount and p is 0, or 1 if the amount is 0). Backprop is the bp runs of the same variant where there are
    some, else of bp's first variant."""
    from scipy import stats

    rows = []
    errors = runs.dropna(subset=["test_error_top1"])
    for (dataset, arch, rule, variant), group in errors.groupby(KEYS, sort=False):
        backprop = errors[(errors.dataset == dataset) & (errors.arch == arch) & (errors.rule == "bp")]
        if rule == "bp" or backprop.empty:
            continue
        baseline = variant if variant in set(backprop.variant) else backprop.variant.iloc[0]
        pairs = group.merge(backprop[backprop.variant == baseline], on="seed", suffixes=("", "_bp"))
        diff = (pairs.test_error_top1 - pairs.test_error_top1_bp).to_numpy()
        n, mean = len(diff), diff.mean() if len(diff) else float("nan")
        low = high = p_value = float("nan")
        if n > 1:
            sem = diff.std(ddof=1) / n ** 0.5
            half = stats.t.ppf(0.975, n - 1) * sem
            low, high = mean - half, mean + half
            p_value = float(stats.ttest_rel(pairs.test_error_top1, pairs.test_error_top1_bp).pvalue) if sem > 0 \
                else float(mean == 0)
        rows.append(dict(dataset=dataset, arch=arch, rule=rule, variant=variant, baseline_variant=baseline,
                         n_pairs=n, diff_mean=mean, ci_low=low, ci_high=high, p_value=p_value))
    return pd.DataFrame(rows, columns=["dataset", "arch", "rule", "variant", "baseline_variant", "n_pairs",
                                       "diff_mean", "ci_low", "ci_high", "p_value"])


def tuning_table(selections: list[Path]) -> pd.DataFrame:
    """Every group's tuning table (selected.json), one column per swept key."""
    frames = []
    for path in selections:
        selection = json.loads(path.read_text())
        table = pd.DataFrame(selection["table"])
        swept = pd.DataFrame([{key: _number_or_text(text) for key, text in point_items(point)}
                              for point in table.point])
        frames.append(pd.concat([pd.DataFrame([selection["group"]] * len(table)), swept,
                                 table.drop(columns="point")], axis=1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=[*KEYS, "n_seeds", "val_error_mean", "val_error_std", "selected"])


def _number_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m feedback_alignment summarize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, nargs="+",
                        help="evaluation.json files, or folders searched for them")
    parser.add_argument("--out", required=True, help="folder for summary.csv, runs.csv and histories.csv")
    parser.add_argument("--tuning", nargs="*", default=[], help="selected.json of each tuned group")
    args = parser.parse_args(argv)
    try:
        runs, history, alignment = load_runs([Path(p) for p in args.runs])
    except FileNotFoundError as error:
        sys.exit(f"summarize: {error}")
    out = Path(args.out)
    summary = summarize(runs)
    reference = references()
    write_csv(out / "runs.csv", runs)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "histories.csv", history)
    write_csv(out / "alignment.csv", alignment)
    write_csv(out / "references.csv", reference)
    write_csv(out / "vs_reference.csv", versus_reference(summary, reference))
    write_csv(out / "comparisons.csv", compare_to_backprop(runs))
    write_csv(out / "tuning.csv", tuning_table([Path(p) for p in args.tuning]))


if __name__ == "__main__":
    main()
