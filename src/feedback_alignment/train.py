"""Train one run: one dataset, architecture, rule, variant and seed.

    python -m feedback_alignment train --dataset digits --data resources/data/digits.pt \
        --arch convnet --rule usf --scale match --epochs 20 --seed 0 --out results/demo/run

Writes into --out: history.csv (one row per epoch), checkpoint.pt (latest), best.pt (the
best-validation weights), result.json (final metrics, resolved config, provenance). A diverging
run (non-finite loss) stops cleanly with status "diverged": a result, not a crash.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data as datasets
from .convert import convert
from .models import build_model
from .optim import BatchManhattan
from .provenance import provenance, torch_save, write_csv, write_json
from .rules import RULES, SCALES

OPTIMIZERS = ("sgd", "batch_manhattan", "adam")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feedback_alignment train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--dataset", required=True, choices=datasets.DATASETS)
    add("--data", required=True, help="prepared dataset file (digits, cifar10) or folder (imagenet)")
    add("--out", required=True, help="run directory to write into")
    add("--arch", required=True, help="convnet, arch1, resnet20/56, or a torchvision model name")
    add("--arch-label", default=None, help="name of this architecture setting in results (default: --arch)")
    add("--variant", default="default", help="name of the technique settings, recorded in results")
    add("--depth", type=int, default=8, help="convnet: number of conv layers")
    add("--width", type=int, default=32, help="convnet: channels per conv layer")
    add("--batch-norm", action=argparse.BooleanOptionalAction, default=True)
    add("--rule", required=True, choices=RULES)
    add("--scale", default="none", choices=SCALES, help="feedback scale technique")
    add("--constrain-weight-norm", action=argparse.BooleanOptionalAction, default=False)
    add("--exclude", nargs="*", default=[], help="module names kept on exact backprop")
    add("--optimizer", default="sgd", choices=OPTIMIZERS)
    add("--lr", type=float, default=0.1)
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", type=float, default=0.0)
    add("--lr-milestones", type=int, nargs="*", default=[], help="epochs at which lr *= lr-gamma")
    add("--lr-gamma", type=float, default=0.1)
    add("--epochs", type=int, default=10)
    add("--batch-size", type=int, default=128)
    add("--crop", type=int, default=None, help="training crop size (default: image size)")
    add("--pad", type=int, default=0, help="zero padding before random crops")
    add("--flip", action=argparse.BooleanOptionalAction, default=False)
    add("--seed", type=int, default=0, help="initial weights, feedback draws and data order")
    add("--threads", type=int, default=None, help="torch CPU threads (set this to the job's cores)")
    add("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    add("--max-batches", type=int, default=None, help="smoke mode: stop each epoch after this many")
    add("--workers", type=int, default=None, help="imagenet DataLoader workers (default: threads)")
    return p


def lr_at(epoch: int, base_lr: float, milestones, gamma: float) -> float:
    """Step schedule: base_lr * gamma^(number of milestones passed)."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(name, parameters, lr, momentum, weight_decay):
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "batch_manhattan":
        return BatchManhattan(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)


def build_run_model(config: dict, num_classes: int, in_channels: int, image_size: int):
    """The converted model of a run, initialized from the run's seed (shared with evaluate)."""
    torch.manual_seed(config["seed"])
    model = build_model(config["arch"], num_classes, in_channels, image_size,
                        config["batch_norm"], config["depth"], config["width"])
    return convert(model, rule=config["rule"], scale=config["scale"], seed=config["seed"],
                   exclude=tuple(config["exclude"]), constrain_weight_norm=config["constrain_weight_norm"])


def accuracy_counts(logits, labels, topk=(1,)):
    """Number of correct predictions within the top k, for each k."""
    top = logits.topk(max(topk), dim=1).indices
    hits = top.eq(labels[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in topk]


@torch.no_grad()
def evaluate(model, loader, topk=(1,)):
    """Top-k error (%) and mean loss of `model` over `loader`."""
    model.eval()
    correct, total, loss_sum = [0] * len(topk), 0, 0.0
    for images, labels in loader:
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct = [c + n for c, n in zip(correct, accuracy_counts(logits, labels, topk))]
        total += labels.shape[0]
    return [100.0 * (1 - c / total) for c in correct], loss_sum / total


def train_one_epoch(model, optimizer, loader, progress):
    """One pass over the training batches: (mean loss, error %, images). Sums stay on the device
    so that a GPU is not synchronized every step; the caller checks the loss for divergence."""
    model.train()
    loss_sum = wrong = None
    seen = 0
    for images, labels in loader:
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        batch_loss = loss.detach() * labels.shape[0]
        batch_wrong = (logits.detach().argmax(1) != labels).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        wrong = batch_wrong if wrong is None else wrong + batch_wrong
        seen += labels.shape[0]
        progress.update(1)
    if seen == 0:
        raise ValueError("no training batch: the training split is smaller than --batch-size")
    return float(loss_sum) / seen, 100.0 * int(wrong) / seen, seen


class Loaders:
    """Training and evaluation batches for tensor datasets (digits, cifar10) on the device."""

    def __init__(self, args, device):
        self.data = datasets.load_tensor_data(args.data, device)
        self.args, self.device = args, device
        self.num_classes = self.data.num_classes
        self.in_channels = self.data.in_channels
        self.image_size = args.crop or self.data.image_size
        if self.image_size > self.data.image_size + 2 * args.pad:
            raise datasets.DataError(f"--crop {args.crop} is larger than the padded {args.dataset} images")

    def train(self, epoch):
        generator = torch.Generator(device=self.device).manual_seed(self.args.seed * 100003 + epoch)
        return datasets.batches(self.data, "train", self.args.batch_size, generator, self.image_size,
                                self.args.pad, self.args.flip, self.args.max_batches)

    def eval(self, split):
        return datasets.batches(self.data, split, self.args.batch_size * 2, None, self.image_size,
                                max_batches=self.args.max_batches)

    def train_batches_per_epoch(self):
        n = self.data.splits["train"][1].shape[0] // self.args.batch_size
        return min(n, self.args.max_batches or n)


def make_loaders(args, device):
    if args.dataset in datasets.TENSOR_DATASETS:
        return Loaders(args, device)
    from .imagenet import ImageNetLoaders
    return ImageNetLoaders(args, device)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {key: value for key, value in vars(args).items() if key != "command"}
    config["arch_label"] = args.arch_label or args.arch
    loaders = make_loaders(args, device)
    model = build_run_model(config, loaders.num_classes, loaders.in_channels, loaders.image_size).to(device)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum, args.weight_decay)
    topk = (1, 5) if loaders.num_classes > 10 else (1,)

    history, best_val, best_epoch, status, diverged_at = [], math.inf, None, "completed", None
    total_batches = args.epochs * loaders.train_batches_per_epoch()
    with tqdm(total=total_batches, desc=f"{args.rule} seed {args.seed}", file=sys.stderr,
              mininterval=5.0, unit="batch") as progress:
        for epoch in range(args.epochs):
            lr = lr_at(epoch, args.lr, args.lr_milestones, args.lr_gamma)
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            train_loss, train_error, seen = train_one_epoch(model, optimizer, loaders.train(epoch), progress)
            seconds = time.perf_counter() - start
            if not math.isfinite(train_loss) or not all(torch.isfinite(p).all() for p in model.parameters()):
                status, diverged_at = "diverged", epoch + 1
                break
            (val_error, *_), _ = evaluate(model, loaders.eval("val"), topk)
            (test_error, *_), _ = evaluate(model, loaders.eval("test"), topk)
            history.append(dict(epoch=epoch + 1, train_loss=train_loss, train_error=train_error,
                                val_error=val_error, test_error=test_error, lr=lr,
                                seconds=seconds, images_per_s=seen / seconds))
            write_csv(out / "history.csv", pd.DataFrame(history))
            if val_error < best_val:
                best_val, best_epoch = val_error, epoch + 1
                torch_save(out / "best.pt", dict(model=model.state_dict(), epoch=epoch + 1))
            torch_save(out / "checkpoint.pt", dict(model=model.state_dict(),
                                                   optimizer=optimizer.state_dict(), epoch=epoch + 1))
            progress.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_error:.2f}%")
    if not history:  # keep the promised files even when the first epoch diverged
        write_csv(out / "history.csv", pd.DataFrame(columns=["epoch", "train_loss", "train_error",
                                                             "val_error", "test_error", "lr",
                                                             "seconds", "images_per_s"]))
        torch_save(out / "checkpoint.pt", dict(model=model.state_dict(), epoch=0))
    last = history[-1] if history else {}
    result = dict(status=status, diverged_at_epoch=diverged_at, epochs_completed=len(history),
                  best_epoch=best_epoch, best_val_error=None if best_epoch is None else best_val,
                  final_train_loss=last.get("train_loss"), final_val_error=last.get("val_error"),
                  final_test_error=last.get("test_error"), num_classes=loaders.num_classes,
                  in_channels=loaders.in_channels, image_size=loaders.image_size,
                  config=config, provenance=provenance(device))
    write_json(out / "result.json", result)
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (datasets.DataError, ValueError) as error:
        sys.exit(f"train: {error}")
    print(f"{args.out}: {result['status']}, best val error {result['best_val_error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
