"""Figures drawn from aggregated results alone (summary.csv, histories.csv): no training here.

    python -m feedback_alignment figures --results results/demo --out results/demo/figures

- test_error_curves.png : test error over epochs, one line per rule (mean over seeds, band = min
  to max), one panel per dataset/arch (rows) and variant (columns); backprop drawn in every panel
- final_error.png       : final test error per rule and variant, mean with a bar from min to max
  over seeds, each seed a dot; diverged runs marked; published reference numbers as red marks
- update_angles.png     : per-layer angle between the rule's weight update and backprop's, over
  training (from alignment.csv; needs training.alignment_every > 0)
- feedback_alignment.png: per-layer angle between B and W, and ||B|| / ||W||, over training
- gradient_norms.png    : per-layer weight-gradient norm at initialization and at the last
  measurement, per rule and variant, beside backprop's on the same batch
- error_vs_depth.png    : final test error against depth (convnet archs), per rule and variant
- sensitivity.png       : validation error against each swept value, per rule and variant, the
  point tuning selected starred (from tuning.csv; needs a tuning block)
A figure without the data it needs says so on its face instead of being left out. Beside each
figure, a CSV of the numbers it plots (figure.csv: panel, series, x, y), so that a reader (or a
test) can check a figure without reading pixels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .provenance import save_figure, write_csv  # noqa: E402
from .rules import RULES  # noqa: E402

def plotted_data(figure) -> pd.DataFrame:
    """Every plotted point of `figure`: its panel (the axis title), its series (the artist's gid,
    else its label), x and y; lines, bars and scatter dots."""
    rows = []
    for axis in figure.axes:
        panel = axis.get_title()
        for line in axis.get_lines():
            series = line.get_gid() or line.get_label()
            rows += [(panel, series, x, y) for x, y in zip(np.ravel(line.get_xdata()), np.ravel(line.get_ydata()))]
        for container in axis.containers:
            if isinstance(container, matplotlib.container.BarContainer):
                rows += [(panel, bar.get_gid() or container.get_label(), bar.get_x() + bar.get_width() / 2,
                          bar.get_height()) for bar in container]
        for collection in axis.collections:
            if isinstance(collection, matplotlib.collections.PathCollection) and collection.get_gid():
                rows += [(panel, collection.get_gid(), x, y) for x, y in collection.get_offsets()]
    return pd.DataFrame(rows, columns=["panel", "series", "x", "y"])


def _save(path: Path, figure) -> None:
    """The figure, and beside it the numbers it plots."""
    write_csv(Path(path).with_suffix(".csv"), plotted_data(figure))
    save_figure(path, figure)


# One colour per rule, in the registry's order: a rule added to rules.py gets the next one.
PALETTE = ("black", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "teal", "maroon", "lime")
RULE_COLORS = dict(zip(RULES, PALETTE))


def _rule_order(rules) -> list[str]:
    return sorted(set(rules), key=lambda r: RULES.index(r) if r in RULES else len(RULES))


def _legend_of_every_rule(axes, where, **options) -> None:
    """One legend with the rules of all panels: a rule may have run with one variant only."""
    entries = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = _rule_order(entries)
    where.legend([entries[label] for label in labels], labels, **options)


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
    _legend_of_every_rule(axes, axes[0][-1], title="rule", fontsize=8)
    seeds = history.groupby(["dataset", "arch", "rule", "variant"])["seed"].nunique()
    count = str(seeds.min()) if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    figure.suptitle(f"Test error during training (line: mean over {count} seeds, band: best to worst seed)",
                    fontsize=11)
    figure.tight_layout()
    _save(path, figure)
    plt.close(figure)


def _spread(mean, low, high):
    """Whiskers from min to max around the mean; never negative (rounding makes the mean of equal
    values exceed them by an ulp), zero where undefined."""
    below = np.nan_to_num(np.clip(np.asarray(mean, dtype=float) - np.asarray(low, dtype=float), 0, None))
    above = np.nan_to_num(np.clip(np.asarray(high, dtype=float) - np.asarray(mean, dtype=float), 0, None))
    return [np.atleast_1d(below), np.atleast_1d(above)]


def _placeholder(path: Path, message: str) -> None:
    figure, axis = plt.subplots(figsize=(6, 1.6))
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10)
    _save(path, figure)
    plt.close(figure)


def final_error(summary: pd.DataFrame, runs: pd.DataFrame, path: Path,
                reference: pd.DataFrame | None = None) -> None:
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
                         label=None if variant in labelled else variant, gid=f"{rule} ({variant})")
                labelled.add(variant)
                if pd.notna(g.test_error_mean):  # every seed diverged: no bar, only the count
                    axis.errorbar(x, g.test_error_mean, yerr=_spread(g.test_error_mean, g.test_error_min,
                                                                     g.test_error_max), color="black", capsize=3)
                seeds = runs[(runs.dataset == dataset) & (runs.arch == arch) & (runs.rule == rule)
                             & (runs.variant == variant)]
                axis.scatter([x] * len(seeds), seeds.test_error_top1, s=9, color="black", zorder=3,
                             gid=f"{rule} ({variant}) seeds")
                label = f"{g.test_error_mean:.1f}" if pd.notna(g.test_error_mean) else "-"
                if g.n_diverged:
                    label += f"\n{g.n_diverged}/{g.n_seeds} diverged"
                top = g.test_error_max if pd.notna(g.test_error_max) else 0.0
                axis.annotate(label, (x, top), ha="center", va="bottom", fontsize=7,
                              xytext=(0, 2), textcoords="offset points")
        if reference is not None:
            published = reference[(reference.dataset == dataset) & (reference.arch == arch)]
            for r_index, rule in enumerate(rules):
                value = published.loc[published.rule == rule, "test_error_top1"]
                if len(value):
                    axis.plot([r_index - 0.45, r_index + 0.45], [value.iloc[0]] * 2, color="red",
                              linewidth=2, label="published (BioTorch)" if "pub" not in labelled else None)
                    labelled.add("pub")
        axis.set_xticks(range(len(rules)), rules)
        axis.set_ylabel("final test error (%)")
        axis.set_title(f"{dataset} / {arch}: bar = mean, whisker = min-max, dots = seeds", fontsize=10)
        axis.legend(title="variant", fontsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    _save(path, figure)
    plt.close(figure)


def _layer_colors(count: int):
    colormap = plt.get_cmap("viridis")
    return [colormap(i / max(count - 1, 1)) for i in range(count)]


def _alignment_panels(alignment: pd.DataFrame):
    """(dataset, arch, variant) groups with asymmetric rules, and those rules in order."""
    shown = alignment[alignment.rule != "bp"]
    groups = shown[["dataset", "arch", "variant"]].drop_duplicates().values.tolist()
    return groups, _rule_order(shown.rule)


def per_layer_over_training(alignment: pd.DataFrame, path: Path, columns: list[tuple[str, str]],
                            title: str) -> None:
    """One row of panels per (dataset, arch, variant) and measured quantity, one column per rule;
    one line per layer (dark: first layer, yellow: last), mean over seeds."""
    groups, rules = _alignment_panels(alignment)
    rows = [(group, column) for group in groups for column in columns]
    figure, axes = plt.subplots(len(rows), len(rules), squeeze=False, sharex=True,
                                figsize=(3.3 * len(rules), 2.6 * len(rows)))
    for row, ((dataset, arch, variant), (column, label)) in enumerate(rows):
        group = alignment[(alignment.dataset == dataset) & (alignment.arch == arch)
                          & (alignment.variant == variant)]
        for col, rule in enumerate(rules):
            axis = axes[row][col]
            here = group[group.rule == rule]
            if here.empty:  # this rule did not run with this variant
                axis.text(0.5, 0.5, f"no {rule} runs\nwith variant {variant}", ha="center",
                          va="center", transform=axis.transAxes, color="gray", fontsize=8)
                axis.set_axis_off()
                continue
            layers = list(dict.fromkeys(here.layer))
            for color, layer in zip(_layer_colors(len(layers)), layers):
                curve = here[here.layer == layer].groupby("step")[column].mean()
                axis.plot(curve.index, curve.values, color=color, linewidth=1.2,
                          label=layer if layer in (layers[0], layers[-1]) else None)
            if column == "norm_ratio":
                axis.set_yscale("log")
                axis.axhline(1.0, color="gray", linestyle=":", linewidth=1)
                low, high = axis.get_ylim()  # at least a factor 2 each way, so 1 +- 2% looks flat
                axis.set_ylim(min(low, 0.5), max(high, 2.0))
            elif column.startswith("angle"):
                axis.set_ylim(0, 100)
                axis.axhline(90, color="gray", linestyle=":", linewidth=1)
            axis.set_title(f"{rule} — {dataset}/{arch}, {variant}", fontsize=8)
            if col == 0:
                axis.set_ylabel(label, fontsize=9)
            if row == len(rows) - 1:
                axis.set_xlabel("training step")
            axis.grid(True, alpha=0.3)
            if layers and row == 0 and col == len(rules) - 1:
                axis.legend(title="layer", fontsize=7, title_fontsize=7)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    _save(path, figure)
    plt.close(figure)


def gradient_norms(alignment: pd.DataFrame, path: Path) -> None:
    """Per layer (x: input to output), the rule's weight-gradient norm divided by backprop's on the
    same weights and batch, at the first and at the last measurement. 1 means the rule's error
    signal has the size of the true one; growth towards the input is explosion, decay vanishing."""
    groups, rules = _alignment_panels(alignment)
    figure, axes = plt.subplots(len(groups), 2, squeeze=False, sharey="row",
                                figsize=(10, 3.4 * len(groups)))
    for row, (dataset, arch, variant) in enumerate(groups):
        group = alignment[(alignment.dataset == dataset) & (alignment.arch == arch)
                          & (alignment.variant == variant)]
        for col, (when, pick) in enumerate((("at initialization", min), ("at the last measurement", max))):
            axis = axes[row][col]
            for rule in rules:
                here = group[group.rule == rule]
                if here.empty:
                    continue
                at = here[here.step == pick(here.step)]
                layers = list(dict.fromkeys(at.layer))
                means = at.groupby("layer", sort=False)[["grad_norm", "grad_norm_bp"]].mean().loc[layers]
                axis.plot(range(len(layers)), means.grad_norm / means.grad_norm_bp, marker="o",
                          markersize=3, color=RULE_COLORS.get(rule), label=rule)
            axis.axhline(1.0, color="black", linestyle="--", linewidth=1, label="= backprop")
            axis.set_yscale("log")
            axis.set_xlabel("layer (input -> output)")
            axis.set_title(f"{dataset}/{arch}, {variant}: {when}", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
        axes[row][0].set_ylabel("||dL/dW|| rule / backprop")
        axes[row][-1].legend(fontsize=7)
    figure.suptitle("Weight-gradient norm per layer relative to backprop on the same weights and batch:\n"
                    "above 1 the error signal explodes, below 1 it vanishes", fontsize=10)
    figure.tight_layout()
    _save(path, figure)
    plt.close(figure)


def error_vs_depth(summary: pd.DataFrame, path: Path) -> None:
    deep = summary[summary.depth.notna()]
    variants = [v for v in deep.variant.drop_duplicates() if (deep.loc[deep.variant == v, "rule"] != "bp").any()]
    columns = min(3, len(variants))
    rows = -(-len(variants) // columns)
    figure, axes = plt.subplots(rows, columns, squeeze=False, sharey=True,
                                figsize=(4.4 * columns, 3.6 * rows))
    for extra in range(len(variants), rows * columns):
        axes[extra // columns][extra % columns].axis("off")
    backprop = deep[deep.rule == "bp"]
    for index, variant in enumerate(variants):
        axis = axes[index // columns][index % columns]
        shown = pd.concat([backprop, deep[(deep.variant == variant) & (deep.rule != "bp")]])
        for rule in _rule_order(shown.rule):
            here = shown[shown.rule == rule].groupby("depth")[["test_error_mean", "test_error_min",
                                                             "test_error_max", "n_diverged"]].mean()
            axis.errorbar(here.index, here.test_error_mean,
                          yerr=_spread(here.test_error_mean, here.test_error_min, here.test_error_max),
                          color=RULE_COLORS.get(rule), marker="o", capsize=3, label=rule,
                          linestyle="--" if rule == "bp" else "-")
            for depth, diverged in here.n_diverged.items():
                if diverged:
                    axis.annotate(f"{diverged:.0f} div.", (depth, here.test_error_max[depth]), fontsize=6,
                                  color=RULE_COLORS.get(rule), xytext=(2, 2), textcoords="offset points")
        axis.set_xscale("log", base=2)
        depths = sorted(deep.depth.unique())
        axis.set_xticks(depths, [f"{d:.0f}" for d in depths])
        axis.set_yscale("log")
        axis.set_xlabel("depth (conv layers)")
        axis.set_title(f"variant: {variant}", fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("final test error (%, log)")
    if len(variants) < rows * columns:  # a free slot: the legend goes there, off the data
        _legend_of_every_rule(axes, axes[-1][-1], title="rule", fontsize=9, loc="center")
    else:
        _legend_of_every_rule(axes, axes[0][-1], title="rule", fontsize=8)
    figure.suptitle("Final test error against depth (mean over seeds, whiskers: min-max)", fontsize=11)
    figure.tight_layout()
    _save(path, figure)
    plt.close(figure)


TUNING_COLUMNS = ("dataset", "arch", "rule", "variant", "n_seeds", "val_error_mean", "val_error_std", "selected")
VARIANT_STYLES = ("-", "--", ":", "-.")


def sensitivity(tuning: pd.DataFrame, path: Path) -> None:
    """One panel per (dataset, arch) and swept key: each group's validation error against the
    key's values, its other swept keys held at their selected values."""
    keys = [column for column in tuning.columns if column not in TUNING_COLUMNS]
    panels = tuning[["dataset", "arch"]].drop_duplicates().values.tolist()
    variants = list(tuning.variant.drop_duplicates())
    figure, axes = plt.subplots(len(panels), len(keys), squeeze=False, figsize=(2.0 + 5.0 * len(keys), 4.2 * len(panels)))
    for row, (dataset, arch) in enumerate(panels):
        here = tuning[(tuning.dataset == dataset) & (tuning.arch == arch)]
        for column, key in enumerate(keys):
            axis = axes[row][column]
            for (rule, variant), group in here.groupby(["rule", "variant"], sort=False):
                chosen = group[group.selected.astype(bool)].iloc[0]
                line = group.dropna(subset=[key])
                for other in keys:
                    if other != key and pd.notna(chosen[other]):
                        line = line[line[other] == chosen[other]]
                if line.empty:
                    continue
                line = line.sort_values(key)
                color = RULE_COLORS.get(rule)
                axis.plot(line[key], line.val_error_mean, VARIANT_STYLES[variants.index(variant) % len(VARIANT_STYLES)],
                          marker="o", markersize=3, color=color, label=f"{rule} ({variant})")
                axis.plot([chosen[key]], [chosen.val_error_mean], marker="*", markersize=13, color=color,
                          markeredgecolor="black", linestyle="none")
            values = here[key].dropna()
            if pd.api.types.is_numeric_dtype(values):
                if (values > 0).all() and values.max() >= 4 * values.min():
                    axis.set_xscale("log")
                axis.set_xticks(sorted(values.unique()), [f"{v:g}" for v in sorted(values.unique())])
                axis.minorticks_off()
            axis.set_yscale("log")
            for axis_format in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
                axis_format(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.set_xlabel(key)
            axis.set_ylabel("validation error (%, log scale)")
            axis.set_title(f"{dataset} / {arch}", fontsize=10)
            axis.grid(True, which="both", alpha=0.3)
    entries = {}  # every group of every panel, once: a group need not appear in every panel
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    axes[0][-1].legend(list(entries.values()), list(entries), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    seeds = tuning.n_seeds.max()
    figure.suptitle(f"Tuning: validation error per swept value (mean over {seeds} seed{'s' if seeds > 1 else ''}; "
                    "star: selected)", fontsize=11)
    figure.tight_layout()
    _save(path, figure)
    plt.close(figure)


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


MAX_ALIGNMENT_GROUPS = 6


def _focus(alignment: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per-layer figures of many architectures x variants become unreadably tall; beyond
    MAX_ALIGNMENT_GROUPS panels rows, keep each dataset's deepest architecture (most layers),
    where the obstacles are largest, and say so in the title."""
    groups = alignment[["dataset", "arch", "variant"]].drop_duplicates()
    if len(groups) <= MAX_ALIGNMENT_GROUPS:
        return alignment, ""
    layers = alignment.groupby(["dataset", "arch"])["layer"].nunique().reset_index()
    deepest = layers.loc[layers.groupby("dataset")["layer"].idxmax(), ["dataset", "arch"]]
    kept = alignment.merge(deepest, on=["dataset", "arch"])
    return kept, " (deepest architecture: " + ", ".join(f"{d}/{a}" for d, a in deepest.values) + ")"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m feedback_alignment figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="folder with summary.csv, runs.csv, histories.csv")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    try:
        summary, runs = pd.read_csv(results / "summary.csv"), pd.read_csv(results / "runs.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError) as error:
        sys.exit(f"figures: {error}")
    history = _read(results / "histories.csv")
    alignment = _read(results / "alignment.csv") if (results / "alignment.csv").exists() else pd.DataFrame()
    reference = _read(results / "references.csv") if (results / "references.csv").exists() else None
    if history.empty:
        _placeholder(out / "test_error_curves.png", "No completed epoch in any run (all diverged at once?)")
    else:
        test_error_curves(history, out / "test_error_curves.png")
    final_error(summary, runs, out / "final_error.png", reference)
    if alignment.empty or (alignment.rule == "bp").all():
        note = "No alignment measurements of a non-bp rule in this experiment (set training.alignment_every > 0)"
        for name in ("update_angles.png", "feedback_alignment.png", "gradient_norms.png"):
            _placeholder(out / name, note)
    else:
        alignment, focus = _focus(alignment)
        per_layer_over_training(alignment, out / "update_angles.png",
                                [("angle_update", "update vs bp (deg)")],
                                "Angle between the rule's weight update and backprop's, per layer" + focus)
        per_layer_over_training(alignment, out / "feedback_alignment.png",
                                [("angle_feedback_weight", "angle(B, W) (deg)"), ("norm_ratio", "||B|| / ||W||")],
                                "Feedback weights against forward weights, per layer" + focus)
        gradient_norms(alignment, out / "gradient_norms.png")
    tuning = _read(results / "tuning.csv") if (results / "tuning.csv").exists() else pd.DataFrame()
    if tuning.empty:
        _placeholder(out / "sensitivity.png", "No tuning in this experiment (add a tuning block to its config)")
    else:
        sensitivity(tuning, out / "sensitivity.png")
    if summary.get("depth") is None or summary.depth.nunique() < 2:
        _placeholder(out / "error_vs_depth.png", "This experiment has fewer than two convnet depths")
    else:
        error_vs_depth(summary, out / "error_vs_depth.png")


if __name__ == "__main__":
    main()
