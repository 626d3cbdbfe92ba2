"""Tuning: each (dataset, arch, rule, variant) trains at the point of the sweep that did best on
validation data, so that every rule is compared at its own best settings.

    python -m feedback_alignment select --runs TUNING/*/seed*/result.json --out TUNING/selected.json

Reads the tuning runs' result.json (the run's directory name is its point, e.g. lr=0.05; its
score is its best validation error); writes selected.json: per point the number of seeds and
the mean and spread of their validation errors, which point is selected (the lowest mean; of
equal means, the first in sweep order), that point's settings and the runs trained at it. The
train CLI's --selected reads it: the run trains at that point, or, where a tuning run of the
same seed and settings exists, takes that run's results instead of training again.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import semantic_config
from .provenance import write_json

RULE_OPTION = "rule_options."  # a sweep key naming a rule's option: rule_options.NAME
REUSED_FILES = ("history.csv", "alignment.csv", "best.pt")

if TYPE_CHECKING:  # imported where used: the study's check (every Snakemake start) skips pandas
    import pandas as pd


def point_label(items) -> str:
    """A point of the sweep as its label, the tuning run's directory name: "lr=0.05,momentum=0.9"."""
    return ",".join(f"{key}={value}" for key, value in items)


def point_items(point: str) -> list[tuple[str, str]]:
    """A point's label as (key, value as text) pairs; none for "" (an untuned run)."""
    return [(key, text) for key, _, text in (item.partition("=") for item in filter(None, point.split(",")))]


def point_settings(point: str, config: dict) -> dict:
    """The typed values of a point's keys, read from the config of a run trained there."""
    values = {}
    for key, _ in point_items(point):
        if key.startswith(RULE_OPTION):
            values[key] = config["rule_options"][key[len(RULE_OPTION):]]
        else:
            values[key] = config[key]
    return values


def tuning_table(scores: pd.DataFrame) -> pd.DataFrame:
    """`scores`: one row per tuning run (point, seed, val_error; val_error NaN where the run
    diverged before its first evaluation, which then counts as infinitely bad). One row per
    point, in the order first seen: n_seeds, val_error_mean, val_error_std, selected."""
    errors = scores.assign(val_error=scores["val_error"].fillna(math.inf))
    table = errors.groupby("point", sort=False)["val_error"].agg(
        n_seeds="size", val_error_mean="mean", val_error_std=lambda e: e.std(ddof=1)).reset_index()
    table["selected"] = False
    table.loc[table["val_error_mean"].idxmin(), "selected"] = True
    return table


def select(result_paths: list[Path]) -> dict:
    """The selection of one group from its tuning runs' result.json files."""
    rows, configs = [], {}
    for path in result_paths:
        result = json.loads(path.read_text())
        point = path.parent.parent.name
        rows.append(dict(point=point, seed=result["config"]["seed"], val_error=result["best_val_error"],
                         run=str(path.parent)))
        configs.setdefault(point, result["config"])
    import pandas as pd

    scores = pd.DataFrame(rows)
    table = tuning_table(scores)
    point = table.loc[table["selected"], "point"].iloc[0]
    config = configs[point]
    group = dict(dataset=config["dataset"], arch=config.get("arch_label") or config["arch"], rule=config["rule"],
                 variant=config["variant"])
    return dict(group=group, point=point, settings=point_settings(point, config),
                runs=scores.loc[scores["point"] == point, "run"].tolist(),
                table=table.replace({math.inf: None}).to_dict("records"))


def apply_selection(args: argparse.Namespace) -> list[str]:
    """Train at the selected point: its settings over the flags', and `args.selected` becomes the
    point's label (recorded in the run's config). Returns the tuning runs trained at the point."""
    selection = json.loads(Path(args.selected).read_text())
    for key, value in selection["settings"].items():
        if key.startswith(RULE_OPTION):
            args.rule_option.append(f"{key[len(RULE_OPTION):]}={value}")
        else:
            setattr(args, key, value)
    args.selected = selection["point"]
    return selection["runs"]


def reuse(config: dict, tuning_runs: list[str], out: Path, copy: bool = True) -> dict | None:
    """The result of a finished tuning run with this run's settings and seed, its files (history,
    alignment measurements, best weights) copied into `out` if `copy`; None where there is none."""
    ours = {k: v for k, v in semantic_config(config).items() if k != "selected"}
    for run in map(Path, tuning_runs):
        path = run / "result.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        if {k: v for k, v in semantic_config(result["config"]).items() if k != "selected"} != ours:
            continue
        if copy:
            out.mkdir(parents=True, exist_ok=True)
            for name in REUSED_FILES:
                if (run / name).is_file():
                    shutil.copyfile(run / name, out / name)
        return dict(result, config=config, reused_from=str(run))
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m feedback_alignment select", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, nargs="+", help="result.json of one group's tuning runs")
    parser.add_argument("--out", required=True, help="selected.json to write")
    args = parser.parse_args(argv)
    missing = [path for path in args.runs if not Path(path).is_file()]
    if missing:
        sys.exit(f"select: no such result: {missing[0]}")
    write_json(Path(args.out), select([Path(path) for path in args.runs]))


if __name__ == "__main__":
    main()
