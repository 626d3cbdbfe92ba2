"""Evaluate a finished run's best-validation weights on its test set.

    python -m feedback_alignment evaluate --run results/demo/runs/digits/convnet/usf-match/seed0

Writes evaluation.json into the run directory: top-1 test error (and top-5 where the dataset has
more than 10 classes), the run's status (completed or diverged), resolved config and provenance.
A run that diverged before any validation is reported with status "diverged" and no error value.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .provenance import provenance, write_json
from .runs import build_run_model, evaluate, make_loaders, reported_topk, resolve_device, resolve_precision


def evaluation_record(result: dict, errors: list[float] | None, loss: float | None, device) -> dict:
    """evaluation.json's content: the run's ending (result.json's `result`) and its best weights'
    top-k test errors and mean loss (None where it has no best weights)."""
    evaluation = dict(status=result["status"], best_epoch=result["best_epoch"],
                      epochs_completed=result["epochs_completed"],
                      diverged_at_epoch=result["diverged_at_epoch"],
                      test_error_top1=None, test_error_top5=None,
                      num_classes=result["num_classes"], config=dict(result["config"]),
                      dataset_kind=result.get("dataset_kind", result["config"]["dataset"]))
    if errors is not None:
        evaluation.update(test_error_top1=errors[0], test_loss=loss)
        if len(errors) > 1:
            evaluation["test_error_top5"] = errors[1]
    evaluation["provenance"] = provenance(device)
    return evaluation


def evaluate_run(run_dir: Path, device_name: str = "auto", threads: int | None = None,
                 data: str | None = None) -> dict:
    """Evaluate best.pt again (the train CLI writes evaluation.json itself from the best epoch's
    test pass: this re-measures, e.g. on other data or after a change to the evaluation)."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    result_path = run_dir / "result.json"
    if not result_path.is_file():
        raise FileNotFoundError(f"{result_path} not found: the run has not finished")
    result = json.loads(result_path.read_text())
    config = dict(result["config"])
    device = resolve_device(device_name)
    errors = loss = None
    best = run_dir / "best.pt"
    if result["best_epoch"] is not None and best.is_file():
        loaders = make_loaders({**config, "data": data or config["data"]}, device)
        model = build_run_model(config, result["num_classes"], result["in_channels"],
                                result["image_size"]).to(device)
        model.load_state_dict(torch.load(best, map_location=device, weights_only=True)["model"])
        topk = reported_topk(result["num_classes"])
        precision = resolve_precision(config.get("precision", "fp32"), device)
        errors, loss = evaluate(model, loaders.eval("test"), topk, device=device, precision=precision)
    evaluation = evaluation_record(result, errors, loss, device)
    write_json(run_dir / "evaluation.json", evaluation)
    return evaluation


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m feedback_alignment evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by train")
    parser.add_argument("--data", help="prepared dataset (default: the one the run trained on)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        evaluation = evaluate_run(Path(args.run), args.device, args.threads, args.data)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"evaluate: {error}")
    print(f"{args.run}: {evaluation['status']}, test error {evaluation['test_error_top1']}", file=sys.stderr)


if __name__ == "__main__":
    main()
