"""Train one run: one dataset, architecture, rule, variant and seed.

    python -m feedback_alignment train --dataset digits --data resources/data/digits.pt \
        --arch convnet --rule usf --scale match --epochs 20 --seed 0 --out results/demo/run

Writes into --out: history.csv (one row per epoch), checkpoint.pt (latest), best.pt (the
best-validation weights), result.json (final metrics, resolved config, provenance). A diverging
run (non-finite loss or weights) stops cleanly with status "diverged": a result, not a crash.

checkpoint.pt is written after every epoch and when SIGTERM or SIGUSR1 arrives (what SLURM sends
before preemption). Rerunning the same command resumes from it, mid-epoch included: model,
optimizer, feedback buffers, RNG states and data order, so that on a CPU the resumed run ends with
exactly the metrics of an uninterrupted one. A checkpoint from another config or code version is
refused.

On a GPU, --precision auto trains under bf16 autocast and --channels-last auto uses the
channels_last layout; --compile compiles the converted model. Under torchrun the run is data
parallel (see distributed.py): the same results as one process with the same --batch-size.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import alignment, settings, tuning
from . import data as datasets
from .checkpoint import TrainState, resume, save_checkpoint
from .convert import after_step, feedback_layers, set_progress
from .distributed import BACKENDS, World, claim_gpu_slot, close_world, cuda_device_ids, init_world
from .evaluate import evaluate_run, evaluation_record
from .optim import BatchManhattan
from .provenance import provenance, torch_save, write_csv, write_json
from .rules import RULES, SCALES, get_rule
from .runs import (Loaders, autocast, build_run_model, evaluate, make_loaders, reported_topk, resolve_device,
                   resolve_precision)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feedback_alignment train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--dataset", required=True, help="the dataset's name in the study (recorded in results)")
    add("--data", required=True, help="the prepared dataset: a cache (.pt) or, for imagenet, a manifest (.json)")
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
    settings.add_arguments(p)  # epochs, batch size, optimizer, schedule, precision, ... (settings.py)
    add("--crop", type=int, default=None, help="training crop size (default: image size)")
    add("--pad", type=int, default=0, help="zero padding before random crops")
    add("--flip", action=argparse.BooleanOptionalAction, default=False)
    add("--seed", type=int, default=0, help="initial weights, feedback draws and data order")
    add("--threads", type=int, default=None, help="torch CPU threads (set this to the job's cores)")
    add("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 (cuda where "
        "CUDA is not usable stops with an error, never falls back to the cpu)")
    add("--dist-backend", default="auto", choices=BACKENDS,
        help="process group under torchrun: auto = nccl when each process has a GPU of its own, gloo "
             "when processes share GPUs or run on the CPU")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels_last memory layout (default: on CUDA only)")
    add("--runs-per-gpu", type=int, default=1,
        help="on a machine with GPUs, how many runs may share one: --device auto/cuda takes a free "
             "GPU slot, waiting while all are taken")
    add("--alignment-batch", type=int, default=128, help="images in the alignment probe batch")
    add("--rule-option", action="append", default=[], metavar="KEY=VALUE",
        help="one of the rule's own settings (repeat for several): " + "; ".join(
            f"{rule}: " + ", ".join(f"{o.name} (default {o.default}: {o.help})" for o in get_rule(rule).options)
            for rule in RULES if get_rule(rule).options))
    add("--workers", type=int, default=None, help="imagenet DataLoader workers (default: threads)")
    add("--selected", default=None, metavar="SELECTED_JSON",
        help="a tuning selection (python -m feedback_alignment select): train at its point, or take the "
             "results of its tuning run of this seed and settings where there is one")
    return p


def lr_at(epoch: int, base_lr: float, milestones, gamma: float) -> float:
    """Step schedule: base_lr * gamma^(number of milestones passed)."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """The model's Parameters for the optimizer: a B learned from an alignment regulariser
    (sa, aa, ia) in a group without weight decay, as R's own decay term is B's weight decay;
    everything else (kp's B included: its rule is W's update and decay) in the other."""
    regularized = {id(layer.feedback_direction) for _, layer in feedback_layers(model)
                   if layer.rule.learning == "regularizer"}
    plain = [p for p in model.parameters() if id(p) not in regularized]
    learned = [p for p in model.parameters() if id(p) in regularized]
    return [{"params": plain}] + ([{"params": learned, "weight_decay": 0.0}] if learned else [])


def build_optimizer(name, parameters, lr, momentum, weight_decay):
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "batch_manhattan":
        return BatchManhattan(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)


def parse_rule_options(rule: str, pairs: list[str]) -> dict:
    """--rule-option KEY=VALUE pairs as the rule's checked options, defaults filled in."""
    return get_rule(rule).parse_options(pairs, flag="--rule-option ")


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 so that the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


HISTORY_COLUMNS = ["epoch", "train_loss", "train_error", "val_error", "test_error", "lr",
                   "images", "seconds", "images_per_s"]
DIVERGENCE_CHECK_EVERY = 20  # steps; a check synchronizes a GPU, so not every step


@dataclass
class Training:
    """One run's parts, built once by `setup`; of them, only `state` (and the model's and the
    optimizer's own states) change as the run goes."""
    args: argparse.Namespace
    config: dict  # the resolved config, recorded in checkpoint and result
    out: Path
    world: World
    device: torch.device
    precision: str
    channels_last: bool
    loaders: Loaders  # or imagenet.StreamedLoaders, which has the same interface
    model: torch.nn.Module  # holds the state: saved, evaluated, measured
    forward: torch.nn.Module  # what the training step calls (under DDP and/or compiled)
    compiled: torch.nn.Module  # what evaluation calls
    optimizer: torch.optim.Optimizer
    probe: tuple | None  # the fixed batch alignment is measured on
    stop: StopRequest
    gpu_lock: object
    state: TrainState = field(default_factory=TrainState)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def total_steps(self) -> int:
        return self.args.epochs * self.loaders.train_batches_per_epoch()


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    tuning_runs = tuning.apply_selection(args) if args.selected else []
    world, device_name = init_world(args.device, args.batch_size, args.dist_backend)
    try:
        return _run(args, world, device_name, tuning_runs)
    finally:
        close_world(world)


def _run(args, world: World, device_name: str, tuning_runs: list[str]) -> dict:
    config = run_config(args)
    reused = tuning.reuse(config, tuning_runs, Path(args.out), copy=world.is_main)
    if reused is not None:  # a tuning run trained this one already: no model to train
        result = finish(world, Path(args.out), reused)
        if world.is_main:  # its best weights, measured again under this run's config
            evaluate_run(Path(args.out), device_name, args.threads)
        return result
    t = setup(args, config, world, device_name)
    if t.checkpoint_path.is_file():
        t.state = resume(t.checkpoint_path, t.config, t.model, t.optimizer, t.device)
        if world.is_main:
            print(f"resuming from {t.checkpoint_path}: epoch {t.state.epoch + 1}, "
                  f"batch {t.state.batches['next'] if t.state.batches else 0}", file=sys.stderr)
    if t.probe is not None and t.state.step == 0 and not t.state.alignment:
        measure_alignment(t, 0)  # at initialization
    total = t.total_steps
    diverged_at = None
    with tqdm(total=total, initial=min(t.state.step, total), desc=f"{args.rule} seed {args.seed}",
              file=sys.stderr, mininterval=5.0, unit="batch", disable=not world.is_main) as progress:
        while t.state.epoch < args.epochs and diverged_at is None:
            diverged_at = train_epoch(t, progress)
    write_tables(t)  # again: a diverged or empty run still gets its (possibly empty) history
    result = finish(world, t.out, run_result(t, diverged_at))
    if world.is_main:  # the best epoch's test pass: what evaluating best.pt again would measure
        best = t.state.best_test or {}
        write_json(t.out / "evaluation.json",
                   evaluation_record(result, best.get("errors"), best.get("loss"), t.device))
    if t.gpu_lock is not None:
        t.gpu_lock.close()
    return result


def finish(world: World, out: Path, result: dict) -> dict:
    """result.json, written by rank 0; every rank leaves once it is there."""
    if world.is_main:
        write_json(out / "result.json", result)
    world.barrier()
    return result


def run_config(args) -> dict:
    """The run's resolved config, recorded in its checkpoint and result: the flags, with the
    architecture's label and the rule's options (checked, defaults filled in)."""
    if args.runs_per_gpu < 1:
        raise ValueError(f"--runs-per-gpu {args.runs_per_gpu} must be at least 1")
    config = {key: value for key, value in vars(args).items() if key not in ("command", "rule_option")}
    config["arch_label"] = args.arch_label or args.arch
    config["rule_options"] = parse_rule_options(args.rule, args.rule_option)
    return config


def claim_device(device_name: str, runs_per_gpu: int, world: World):
    """The device of a single-process run. Given auto or a bare cuda on a machine with GPUs, take a
    free GPU slot, so that concurrent jobs spread over the GPUs (runs_per_gpu of them per GPU)."""
    device = resolve_device(device_name)
    if device.type != "cuda" or device.index is not None or world.distributed:
        return device, None
    index, lock = claim_gpu_slot(cuda_device_ids(), runs_per_gpu)
    return torch.device("cuda", index), lock


def setup(args, config: dict, world: World, device_name: str) -> Training:
    """Everything a run needs, checked before anything is written: a refused run leaves nothing."""
    device, gpu_lock = claim_device(device_name, args.runs_per_gpu, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    loaders = make_loaders(config, device, world)
    if loaders.train_batches_per_epoch() == 0:
        raise ValueError(f"no training batch: the {args.dataset} training split is smaller than "
                         f"--batch-size {args.batch_size}")
    model = build_run_model(config, loaders.num_classes, loaders.in_channels, loaders.image_size)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if world.distributed and device.type == "cuda":
        # Batch statistics over the global batch, as in the single-process run. (gloo on CPU has
        # no SyncBatchNorm: there each rank normalizes over its share.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Built after conversion: under kp, sa, aa and ia the optimizer also trains B (a Parameter there).
    optimizer = build_optimizer(args.optimizer, parameter_groups(model), args.lr, args.momentum, args.weight_decay)
    forward, compiled = wrap_model(model, args.compile, world, device)
    probe = loaders.probe_batch(args.alignment_batch) if args.alignment_every > 0 else None
    training = Training(args, config, Path(args.out), world, device, resolve_precision(args.precision, device),
                        channels_last, loaders, model, forward, compiled, optimizer, probe, StopRequest(), gpu_lock)
    training.out.mkdir(parents=True, exist_ok=True)
    return training


def wrap_model(model, compile_model: bool, world: World, device: torch.device):
    """(what the training step calls, what evaluation calls)."""
    compiled = torch.compile(model) if compile_model else model
    if not world.distributed:
        return compiled, compiled
    # Buffers are not broadcast: feedback buffers are equal on every rank by construction, and
    # broadcasting 11M-value B tensors every step would cost more than the step.
    forward = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    # Compiled around DDP, not inside it: the compiler then splits the graph at DDP's gradient
    # buckets, so that each bucket's all-reduce starts while the rest of the backward runs.
    return (torch.compile(forward) if compile_model else forward), compiled


def train_epoch(t: Training, progress) -> dict | None:
    """One epoch (or the rest of an interrupted one), then its evaluation; where the run diverged
    (epoch and step) if it did, else None."""
    epoch, args = t.state.epoch, t.args
    lr = lr_at(epoch, args.lr, args.lr_milestones, args.lr_gamma)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    epoch_batches = t.loaders.train(epoch, t.state.batches)
    # Loss and error sums stay on the device: no GPU synchronization per step.
    sums = t.state.sums or dict(loss=torch.zeros((), device=t.device),
                                wrong=torch.zeros((), device=t.device, dtype=torch.int64),
                                first_bad_step=torch.full((), -1, device=t.device), seen=0)
    t.model.train()
    total_steps = t.total_steps
    # Only a rule option on a schedule reads the progress: other models skip the walk over layers.
    needs_progress = any(layer.needs_progress for _, layer in feedback_layers(t.model))
    start = time.perf_counter()
    for images, labels in epoch_batches:
        if needs_progress:
            set_progress(t.model, t.state.step / total_steps)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        t.optimizer.zero_grad(set_to_none=True)
        with autocast(t.precision, t.device):
            logits = t.forward(images)
            loss = F.cross_entropy(logits, labels)
        loss.backward()
        t.optimizer.step()
        t.state.step += 1
        after_step(t.model, t.state.step)  # the rule's work between steps (wm: its mirror phase)
        sums["loss"] += loss.detach().float() * labels.shape[0]
        # Where the loss first went non-finite, recorded on the device without a sync.
        sums["first_bad_step"] = torch.where((sums["first_bad_step"] < 0) & ~torch.isfinite(loss.detach()),
                                             t.state.step, sums["first_bad_step"])
        sums["wrong"] += (logits.detach().argmax(1) != labels).sum()
        sums["seen"] += labels.shape[0]
        progress.update(1)
        if t.probe is not None and t.state.step % args.alignment_every == 0:
            measure_alignment(t, epoch + 1)
        signalled, non_finite = stop_or_diverged(t, sums)
        if non_finite:
            break
        if signalled:
            t.state.sums, t.state.epoch_seconds = sums, t.state.epoch_seconds + time.perf_counter() - start
            checkpoint_and_exit(t, epoch_batches)
    return finish_epoch(t, lr, sums, t.state.epoch_seconds + time.perf_counter() - start)


def stop_or_diverged(t: Training, sums: dict) -> tuple[bool, bool]:
    """(a stop signal arrived, the loss went non-finite). One process sees a signal at once and
    checks the loss every few steps; under torchrun the ranks agree on both every few steps."""
    check_now = t.state.step % DIVERGENCE_CHECK_EVERY == 0
    if t.world.distributed:
        if not check_now:
            return False, False
        return tuple(t.world.any([t.stop.signal is not None, not torch.isfinite(sums["loss"])], t.device))
    return t.stop.signal is not None, check_now and not bool(torch.isfinite(sums["loss"]))


def checkpoint_and_exit(t: Training, epoch_batches) -> None:
    save(t, epoch_batches)
    t.world.barrier()  # nobody leaves before rank 0 has written the checkpoint
    raise SystemExit(f"train: {t.stop.signal or 'stop'} at epoch {t.state.epoch + 1}, step {t.state.step}: "
                     f"checkpoint saved to {t.checkpoint_path}; rerun to resume")


def finish_epoch(t: Training, lr: float, sums: dict, seconds: float) -> dict | None:
    """The epoch's metrics (or where it diverged), evaluation on val and test, the best weights
    so far, the checkpoint."""
    epoch = t.state.epoch
    loss_sum, wrong, seen = t.world.sum([float(sums["loss"]), int(sums["wrong"]), sums["seen"]], t.device)
    train_loss, train_error = loss_sum / seen, 100.0 * wrong / seen
    if not math.isfinite(train_loss) or not all(torch.isfinite(p).all() for p in t.model.parameters()):
        bad_step = int(sums["first_bad_step"])
        return dict(epoch=epoch + 1, step=bad_step if bad_step > 0 else t.state.step)
    topk = reported_topk(t.loaders.num_classes)
    (val_error, *_), _ = evaluate(t.compiled, t.loaders.eval("val"), topk, t.world, t.device, t.precision)
    test_errors, test_loss = evaluate(t.compiled, t.loaders.eval("test"), topk, t.world, t.device, t.precision)
    test_error = test_errors[0]
    t.state.history.append(dict(epoch=epoch + 1, train_loss=train_loss, train_error=train_error,
                                val_error=val_error, test_error=test_error, lr=lr,
                                images=int(seen), seconds=seconds, images_per_s=seen / seconds))
    write_tables(t)
    if val_error < t.state.best_val:
        t.state.best_val, t.state.best_epoch = val_error, epoch + 1
        t.state.best_test = dict(errors=test_errors, loss=test_loss)
        if t.world.is_main:
            torch_save(t.out / "best.pt", dict(model=t.model.state_dict(), epoch=epoch + 1))
    t.state.epoch, t.state.sums, t.state.epoch_seconds = epoch + 1, None, 0.0
    save(t)
    return None


def save(t: Training, epoch_batches=None) -> None:
    """checkpoint.pt (rank 0 only), with the position in the epoch's batches if interrupted."""
    t.state.batches = epoch_batches.state_dict() if epoch_batches is not None else None
    if t.world.is_main:
        save_checkpoint(t.checkpoint_path, t.config, t.model, t.optimizer, t.device, t.state)


def measure_alignment(t: Training, epoch: int) -> None:
    # Every rank measures (the same batch, the same weights): SyncBatchNorm needs them all.
    frame = alignment.measure(t.model, *t.probe)
    t.state.alignment += frame.assign(epoch=epoch, step=t.state.step).to_dict("records")


def write_tables(t: Training) -> None:
    if not t.world.is_main:
        return
    write_csv(t.out / "history.csv", pd.DataFrame(t.state.history, columns=HISTORY_COLUMNS))
    if t.state.alignment:
        write_csv(t.out / "alignment.csv", pd.DataFrame(t.state.alignment))


def run_result(t: Training, diverged_at: dict | None) -> dict:
    """result.json: how the run ended, its metrics, resolved config and provenance."""
    history, best_epoch = t.state.history, t.state.best_epoch
    last = history[-1] if history else {}
    return dict(status="completed" if diverged_at is None else "diverged",
                diverged_at_epoch=diverged_at and diverged_at["epoch"],
                diverged_at_step=diverged_at and diverged_at["step"], epochs_completed=len(history),
                best_epoch=best_epoch, best_val_error=None if best_epoch is None else t.state.best_val,
                final_train_loss=last.get("train_loss"), final_val_error=last.get("val_error"),
                final_test_error=last.get("test_error"), dataset_kind=t.loaders.kind,
                num_classes=t.loaders.num_classes,
                in_channels=t.loaders.in_channels, image_size=t.loaders.image_size,
                config=t.config, provenance=provenance(t.device),
                placement=dict(world_size=t.world.size, precision=t.precision,
                               channels_last=t.channels_last, compile=t.args.compile))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (datasets.DataError, ValueError, FileNotFoundError) as error:
        sys.exit(f"train: {error}")
    reused = f" (the results of tuning run {result['reused_from']}, not trained again)" if "reused_from" in result else ""
    print(f"{args.out}: {result['status']}, best val error {result['best_val_error']}{reused}", file=sys.stderr)


if __name__ == "__main__":
    main()
