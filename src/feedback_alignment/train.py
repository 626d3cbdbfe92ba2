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
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import alignment, settings
from . import data as datasets
from .convert import after_step
from .distributed import BACKENDS, World, claim_gpu_slot, close_world, cuda_device_ids, init_world
from .optim import BatchManhattan
from .provenance import git_sha, provenance, torch_save, write_csv, write_json
from .rules import RULES, SCALES, get_rule
from .runs import autocast, build_run_model, evaluate, make_loaders, reported_topk, resolve_device, resolve_precision


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
    return p


def lr_at(epoch: int, base_lr: float, milestones, gamma: float) -> float:
    """Step schedule: base_lr * gamma^(number of milestones passed)."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def build_optimizer(name, parameters, lr, momentum, weight_decay):
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "batch_manhattan":
        return BatchManhattan(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)


def parse_rule_options(rule: str, pairs: list[str]) -> dict:
    """--rule-option KEY=VALUE pairs as the rule's checked options, defaults filled in."""
    given = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--rule-option {pair!r}: write KEY=VALUE")
        given[key] = value
    return get_rule(rule).resolve_options(given)


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 so that the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


class CheckpointMismatch(ValueError):
    pass


# Flags that change where or how fast a run goes, not what it computes (beyond float rounding).
PLACEMENT_KEYS = ("out", "data", "threads", "device", "workers", "channels_last", "compile",
                  "runs_per_gpu", "dist_backend")


def semantic_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PLACEMENT_KEYS}


def check_checkpoint(checkpoint: dict, config: dict, path: Path) -> None:
    """Refuse to resume from a checkpoint that another config or code version wrote."""
    theirs, ours = checkpoint["config"], semantic_config(config)
    differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differing:
        key = differing[0]
        raise CheckpointMismatch(f"{path} was written with a different config ({key}: "
                                 f"{theirs.get(key)!r} there, {ours.get(key)!r} now); "
                                 "delete it to start over")
    sha = git_sha()
    if checkpoint["git_sha"] != sha and "unknown" not in (checkpoint["git_sha"], sha):
        raise CheckpointMismatch(f"{path} was written by code version {checkpoint['git_sha']}, "
                                 f"this is {sha}; delete it to start over")


def rng_states(device) -> dict:
    states = dict(torch=torch.get_rng_state())
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, every tensor on the CPU: the RNG states must reach set_rng_state as CPU byte
    tensors (loaded onto a GPU, torch refuses them), and load_state_dict copies model and
    optimizer states onto the model's device itself."""
    return torch.load(path, map_location="cpu", weights_only=True)


def set_rng_states(states: dict, device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


HISTORY_COLUMNS = ["epoch", "train_loss", "train_error", "val_error", "test_error", "lr",
                   "images", "seconds", "images_per_s"]
DIVERGENCE_CHECK_EVERY = 20  # steps; a check synchronizes a GPU, so not every step


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    world, device_name = init_world(args.device, args.batch_size, args.dist_backend)
    try:
        return _run(args, world, device_name)
    finally:
        close_world(world)


def claim_device(device_name: str, runs_per_gpu: int, world: World):
    """The device of a single-process run. Given auto or a bare cuda on a machine with GPUs, take a
    free GPU slot, so that concurrent jobs spread over the GPUs (runs_per_gpu of them per GPU)."""
    device = resolve_device(device_name)
    if device.type != "cuda" or device.index is not None or world.distributed:
        return device, None
    index, lock = claim_gpu_slot(cuda_device_ids(), runs_per_gpu)
    return torch.device("cuda", index), lock


def _run(args, world: World, device_name: str) -> dict:
    if args.runs_per_gpu < 1:
        raise ValueError(f"--runs-per-gpu {args.runs_per_gpu} must be at least 1")
    device, gpu_lock = claim_device(device_name, args.runs_per_gpu, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(args.precision, device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = Path(args.out)
    config = {key: value for key, value in vars(args).items() if key not in ("command", "rule_option")}
    config["arch_label"] = args.arch_label or args.arch
    config["rule_options"] = parse_rule_options(args.rule, args.rule_option)
    loaders = make_loaders(config, device, world)
    per_epoch = loaders.train_batches_per_epoch()
    if per_epoch == 0:
        raise ValueError(f"no training batch: the {args.dataset} training split is smaller than "
                         f"--batch-size {args.batch_size}")
    model = build_run_model(config, loaders.num_classes, loaders.in_channels, loaders.image_size)
    model = model.to(device, memory_format=memory_format)
    if world.distributed and device.type == "cuda":
        # Batch statistics over the global batch, as in the single-process run. (gloo on CPU has
        # no SyncBatchNorm: there each rank normalizes over its share.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Built after conversion: under kp the optimizer also trains B (a Parameter there).
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum, args.weight_decay)
    # `model` holds the state (saved, evaluated, measured); `forward` is what the training step
    # calls; `compiled` what evaluation calls.
    compiled = torch.compile(model) if args.compile else model
    forward = model
    if world.distributed:
        # Buffers are not broadcast: feedback buffers are equal on every rank by construction,
        # and broadcasting 11M-value B tensors every step would cost more than the step.
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    if args.compile:
        # Compiled around DDP, not inside it: the compiler then splits the graph at DDP's gradient
        # buckets, so that each bucket's all-reduce starts while the rest of the backward runs.
        forward = torch.compile(forward) if world.distributed else compiled
    topk = reported_topk(loaders.num_classes)
    stop = StopRequest()
    out.mkdir(parents=True, exist_ok=True)  # only once the run can start: a refused one leaves nothing

    # Everything a resumed run needs besides model and optimizer.
    state = dict(epoch=0, batches=None, sums=None, step=0, history=[], best_val=math.inf,
                 best_epoch=None, epoch_seconds=0.0, alignment=[])
    probe = loaders.probe_batch(args.alignment_batch) if args.alignment_every > 0 else None

    def measure_alignment(epoch):
        # Every rank measures (the same batch, the same weights): SyncBatchNorm needs them all.
        frame = alignment.measure(model, *probe)
        state["alignment"] += frame.assign(epoch=epoch, step=state["step"]).to_dict("records")
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.is_file():
        checkpoint = load_checkpoint(checkpoint_path)
        check_checkpoint(checkpoint, config, checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_states(checkpoint["rng"], device)
        state = checkpoint["state"]
        if world.is_main:
            print(f"resuming from {checkpoint_path}: epoch {state['epoch'] + 1}, "
                  f"batch {state['batches']['next'] if state['batches'] else 0}", file=sys.stderr)

    def save_checkpoint(epoch_batches=None):
        state["batches"] = epoch_batches.state_dict() if epoch_batches is not None else None
        if world.is_main:
            torch_save(checkpoint_path, dict(config=semantic_config(config), git_sha=git_sha(),
                                             model=model.state_dict(), optimizer=optimizer.state_dict(),
                                             rng=rng_states(device), state=state))

    def write_tables():
        if not world.is_main:
            return
        write_csv(out / "history.csv", pd.DataFrame(state["history"], columns=HISTORY_COLUMNS))
        if state["alignment"]:
            write_csv(out / "alignment.csv", pd.DataFrame(state["alignment"]))

    def should_stop(sums) -> tuple[bool, bool]:
        """(a stop signal arrived, the loss went non-finite), agreed by every rank."""
        return tuple(world.any([stop.signal is not None, not torch.isfinite(sums["loss"])], device))

    status, diverged_at = "completed", None
    if probe is not None and state["step"] == 0 and not state["alignment"]:
        measure_alignment(0)  # at initialization
    with tqdm(total=args.epochs * per_epoch, initial=min(state["step"], args.epochs * per_epoch),
              desc=f"{args.rule} seed {args.seed}", file=sys.stderr, mininterval=5.0,
              unit="batch", disable=not world.is_main) as progress:
        while state["epoch"] < args.epochs and status == "completed":
            epoch = state["epoch"]
            lr = lr_at(epoch, args.lr, args.lr_milestones, args.lr_gamma)
            for group in optimizer.param_groups:
                group["lr"] = lr
            epoch_batches = loaders.train(epoch, state["batches"])
            # Loss and error sums stay on the device: no GPU synchronization per step.
            sums = state["sums"] or dict(loss=torch.zeros((), device=device),
                                         wrong=torch.zeros((), device=device, dtype=torch.int64),
                                         first_bad_step=torch.full((), -1, device=device), seen=0)
            model.train()
            start = time.perf_counter()
            for images, labels in epoch_batches:
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                with autocast(precision, device):
                    logits = forward(images)
                    loss = F.cross_entropy(logits, labels)
                loss.backward()
                optimizer.step()
                state["step"] += 1
                after_step(model, state["step"])  # the rule's work between steps (wm: its mirror phase)
                sums["loss"] += loss.detach().float() * labels.shape[0]
                # Where the loss first went non-finite, recorded on the device without a sync.
                sums["first_bad_step"] = torch.where(
                    (sums["first_bad_step"] < 0) & ~torch.isfinite(loss.detach()),
                    state["step"], sums["first_bad_step"])
                sums["wrong"] += (logits.detach().argmax(1) != labels).sum()
                sums["seen"] += labels.shape[0]
                progress.update(1)
                if probe is not None and state["step"] % args.alignment_every == 0:
                    measure_alignment(epoch + 1)
                # One process sees a stop signal at once; ranks agree on both every few steps.
                check_now = state["step"] % DIVERGENCE_CHECK_EVERY == 0
                if world.distributed:
                    signalled, non_finite = should_stop(sums) if check_now else (False, False)
                else:
                    signalled = stop.signal is not None
                    non_finite = check_now and not torch.isfinite(sums["loss"])
                if non_finite:
                    break
                if signalled:
                    state["sums"] = sums
                    state["epoch_seconds"] += time.perf_counter() - start
                    save_checkpoint(epoch_batches)
                    world.barrier()  # nobody leaves before rank 0 has written the checkpoint
                    raise SystemExit(f"train: {stop.signal or 'stop'} at epoch {epoch + 1}, step "
                                     f"{state['step']}: checkpoint saved to {checkpoint_path}; rerun to resume")
            seconds = state["epoch_seconds"] + time.perf_counter() - start
            loss_sum, wrong, seen = world.sum([float(sums["loss"]), int(sums["wrong"]), sums["seen"]], device)
            train_loss, train_error = loss_sum / seen, 100.0 * wrong / seen
            if not math.isfinite(train_loss) or not all(torch.isfinite(p).all() for p in model.parameters()):
                bad_step = int(sums["first_bad_step"])
                status, diverged_at = "diverged", dict(epoch=epoch + 1,
                                                       step=bad_step if bad_step > 0 else state["step"])
                break
            (val_error, *_), _ = evaluate(compiled, loaders.eval("val"), topk, world, device, precision)
            (test_error, *_), _ = evaluate(compiled, loaders.eval("test"), topk, world, device, precision)
            state["history"].append(dict(epoch=epoch + 1, train_loss=train_loss, train_error=train_error,
                                         val_error=val_error, test_error=test_error, lr=lr,
                                         images=int(seen), seconds=seconds, images_per_s=seen / seconds))
            write_tables()
            if val_error < state["best_val"]:
                state["best_val"], state["best_epoch"] = val_error, epoch + 1
                if world.is_main:
                    torch_save(out / "best.pt", dict(model=model.state_dict(), epoch=epoch + 1))
            state.update(epoch=epoch + 1, sums=None, epoch_seconds=0.0)
            save_checkpoint()
            progress.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_error:.2f}%")

    write_tables()  # again: a diverged or empty run still gets its (possibly empty) history
    history = state["history"]
    last = history[-1] if history else {}
    best_epoch = state["best_epoch"]
    result = dict(status=status, diverged_at_epoch=diverged_at and diverged_at["epoch"],
                  diverged_at_step=diverged_at and diverged_at["step"], epochs_completed=len(history),
                  best_epoch=best_epoch, best_val_error=None if best_epoch is None else state["best_val"],
                  final_train_loss=last.get("train_loss"), final_val_error=last.get("val_error"),
                  final_test_error=last.get("test_error"), num_classes=loaders.num_classes,
                  in_channels=loaders.in_channels, image_size=loaders.image_size,
                  config=config, provenance=provenance(device),
                  placement=dict(world_size=world.size, precision=precision,
                                 channels_last=channels_last, compile=args.compile))
    if world.is_main:
        write_json(out / "result.json", result)
    world.barrier()
    if gpu_lock is not None:
        gpu_lock.close()
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (datasets.DataError, ValueError, FileNotFoundError) as error:
        sys.exit(f"train: {error}")
    print(f"{args.out}: {result['status']}, best val error {result['best_val_error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
