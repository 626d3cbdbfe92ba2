"""Figures drawn from aggregated results alone (summary.csv, histories.csv): no training here.

    python -m feedback_alignment figures --results results/demo --out results/demo/figures

- test_error_curves.png : test error over epochs, one line per rule (mean over seeds, band = min
  to max), one panel per dataset/arch (rows) and variant (columns); backprop drawn in every panel
- final_error.png       : final test error per rule and variant, mean with a bar from min to max
  over seeds, each seed a dot; diverged runs marked
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .provenance import save_figure  # noqa: E402
from .rules import RULES  # noqa: E402

RULE_COLORS = {"bp": "black", "fa": "tab:red", "usf": "tab:blue", "brsf": "tab:green",
               "frsf": "tab:purple", "dfa": "tab:orange", "kp": "tab:brown", "wm": "tab:pink"}


def _rule_order(rules) -> list[str]:
    return sorted(set(rules), key=lambda r: RULES.index(r) if r in RULES else len(RULES))


def test_error_curves(history: pd.DataFrame, path: Path) -> None:
    panels = history[["dataset", "arch"]].drop_duplicates().values.tolist()
    variants = [v for v in history["variant"].drop_duplicates() if
                (history.loc[history.variant == v, "rule"] != "bp").any()] or ["default"]
    figure, axes = plt.subplots(len(panels), len(variants), squeeze=False, sharey=True,
                                figsize=(4.2 * len(variants), 3.4 * len(panels)))
    backprop = history[history.rule == "bp"]
    for row, (dataset, arch) in enumerate(panels):
        here = history[(history.dataset == dataset) & (history.arch == arch)]
        for column, variant in enumerate(variants):
            axis = axes[row][column]
            shown = here[(here.variant == variant) & (here.rule != "bp")]
            shown = pd.concat([backprop[(backprop.dataset == dataset) & (backprop.arch == arch)], shown])
            for rule in _rule_order(shown.rule):
                curves = shown[shown.rule == rule].groupby("epoch")["test_error"]
                mean = curves.mean()
                axis.plot(mean.index, mean.values, color=RULE_COLORS.get(rule), label=rule,
                          linestyle="--" if rule == "bp" else "-")
                axis.fill_between(mean.index, curves.min().values, curves.max().values,
                                  color=RULE_COLORS.get(rule), alpha=0.2, linewidth=0)
            axis.set_yscale("log")
            axis.set_title(f"{dataset} / {arch} — variant: {variant}", fontsize=10)
            axis.set_xlabel("epoch")
            axis.grid(True, which="both", alpha=0.3)
            if column == 0:
                axis.set_ylabel("test error (%, log scale)")
    axes[0][-1].legend(title="rule", fontsize=8)
    seeds = history.groupby(["dataset", "arch", "rule", "variant"])["seed"].nunique()
    count = str(seeds.min()) if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    figure.suptitle(f"Test error during training (line: mean over {count} seeds, band: best to worst seed)",
                    fontsize=11)
    figure.tight_layout()
    save_figure(path, figure)
    plt.close(figure)


def final_error(summary: pd.DataFrame, runs: pd.DataFrame, path: Path) -> None:
    panels = summary[["dataset", "arch"]].drop_duplicates().values.tolist()
    figure, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(8, 3.6 * len(panels)))
    for row, (dataset, arch) in enumerate(panels):
        axis = axes[row][0]
        here = summary[(summary.dataset == dataset) & (summary.arch == arch)]
        variants = list(here["variant"].drop_duplicates())
        rules = _rule_order(here.rule)
        labelled = set()
        for r_index, rule in enumerate(rules):
            present = [v for v in variants if ((here.rule == rule) & (here.variant == v)).any()]
            width = 0.8 / len(present)
            for slot, variant in enumerate(present):  # the rule's variants side by side, centred
                g = here[(here.rule == rule) & (here.variant == variant)].iloc[0]
                x = r_index + (slot - (len(present) - 1) / 2) * width
                color = f"C{variants.index(variant)}"
                axis.bar(x, g.test_error_mean, width * 0.9, color=color, alpha=0.75,
                         label=None if variant in labelled else variant)
                labelled.add(variant)
                axis.errorbar(x, g.test_error_mean, yerr=[[g.test_error_mean - g.test_error_min],
                              [g.test_error_max - g.test_error_mean]], color="black", capsize=3)
                seeds = runs[(runs.dataset == dataset) & (runs.arch == arch) & (runs.rule == rule)
                             & (runs.variant == variant)]
                axis.scatter([x] * len(seeds), seeds.test_error_top1, s=9, color="black", zorder=3)
                label = f"{g.test_error_mean:.1f}"
                if g.n_diverged:
                    label += f"\n{g.n_diverged}/{g.n_seeds} diverged"
                top = g.test_error_max if pd.notna(g.test_error_max) else 0.0
                axis.annotate(label, (x, top), ha="center", va="bottom", fontsize=7,
                              xytext=(0, 2), textcoords="offset points")
        axis.set_xticks(range(len(rules)), rules)
        axis.set_ylabel("final test error (%)")
        axis.set_title(f"{dataset} / {arch}: bar = mean, whisker = min-max, dots = seeds", fontsize=10)
        axis.legend(title="variant", fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    save_figure(path, figure)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m feedback_alignment figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="folder with summary.csv, runs.csv, histories.csv")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    try:
        summary = pd.read_csv(results / "summary.csv")
        runs = pd.read_csv(results / "runs.csv")
        history = pd.read_csv(results / "histories.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError) as error:
        sys.exit(f"figures: {error}")
    if history.empty:
        sys.exit(f"figures: {results / 'histories.csv'} holds no epochs (every run diverged at once?)")
    test_error_curves(history, out / "test_error_curves.png")
    final_error(summary, runs, out / "final_error.png")


if __name__ == "__main__":
    main()
