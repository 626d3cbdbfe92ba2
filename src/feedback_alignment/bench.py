"""Time one training step (forward, backward, SGD step) per rule against plain, unconverted backprop.

    python -m feedback_alignment.bench [--models resnet20 resnet18] [--rounds 30] [--scale match]
    python -m feedback_alignment.bench --device cuda --dtype fp32 bf16        # GPU mode

All variants are built from the same initial weights and timed round-robin in one process, in a
fresh random order each round, so machine load drifts and position effects hit them alike. The
ratio is the median over rounds of (variant step time / plain step time in the same round);
"plain2", a second unconverted variant, measures the noise floor of that ratio. Every variant
runs as --copies model copies whose times are averaged per round (placement in memory alone
makes one copy a steady percent or two faster than another). On a GPU ten steps are timed
together between two synchronizations (--steps-per-sample), in the channels_last layout unless
--no-channels-last, and images/s is the training throughput of one process.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F

from .convert import after_step, convert
from .models import build_model
from .rules import RULES, SCALES, get_rule


def _make_step(model, images, labels, compile_model: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile_model else model
    steps = 0

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(images), labels).backward()
        optimizer.step()
        nonlocal steps
        steps += 1
        after_step(model, steps)  # the rule's between-step work is part of its step (wm's mirror phase)
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_variant(spec: str) -> tuple[str, dict]:
    """A --rules entry, "rule" or "rule:key=value,key=value" (the rule's options), as (rule,
    checked options)."""
    rule, _, settings = spec.partition(":")
    return rule, get_rule(rule).parse_options([pair for pair in settings.split(",") if pair])


def bench_model(arch: str, rules, scale: str, rounds: int, warmup: int, batch_size: int,
                device: torch.device, dtype: str = "fp32", channels_last: bool = False,
                compile_model: bool = False, copies: int = 2, steps_per_sample: int = 1) -> list[dict]:
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    base = build_model(arch, num_classes=10, in_channels=3, image_size=32)
    images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def variant(spec):
        if spec is None:
            return copy.deepcopy(base)
        rule, options = parse_variant(spec)
        # Rules with learned or direct feedback take no scale: they run with 'none'.
        rule_scale = scale if get_rule(rule).scalable else "none"
        return convert(copy.deepcopy(base), rule=rule, scale=rule_scale, seed=0, **options)
    # A second unconverted variant shows the noise floor: its ratio would be 1.000 on a quiet
    # machine. Each variant runs as several model copies, whose times are averaged per round:
    # one copy's memory placement alone can make it a steady 1-2% faster or slower than another.
    kinds = {"plain": None, "plain2": None, **{rule: rule for rule in rules}}
    steps = {(name, index): _make_step(variant(rule).to(device, memory_format=memory_format).train(),
                                       images, labels, compile_model)
             for name, rule in kinds.items() for index in range(copies)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    times = {name: [[] for _ in range(copies)] for name in kinds}
    order = list(steps)
    with autocast:
        for round_index in range(warmup + rounds):
            random.Random(round_index).shuffle(order)
            for name, index in order:
                step = steps[name, index]
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps_per_sample):  # queued back to back: no wait between them
                    step()
                _sync(device)
                if round_index >= warmup:
                    times[name][index].append((time.perf_counter() - start) / steps_per_sample)
    per_round = {name: [statistics.fmean(round_times) for round_times in zip(*copy_times)]
                 for name, copy_times in times.items()}

    def paired_ratio(name):
        return statistics.median(t / p for t, p in zip(per_round[name], per_round["plain"]))
    return [dict(model=arch, variant=name, dtype=dtype, channels_last=channels_last,
                 compile=compile_model, copies=copies, median_ms=1e3 * statistics.median(t),
                 ratio=paired_ratio(name), images_per_s=batch_size / statistics.median(t))
            for name, t in per_round.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    parser.add_argument("--rules", nargs="+", default=list(RULES),
                        help="rules to time, each as RULE or RULE:KEY=VALUE,... with the rule's options "
                             "(aa:examples=32)")
    parser.add_argument("--scale", default="match", choices=SCALES,
                        help="feedback scale of the converted variants (match does the most per-step work)")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--copies", type=int, default=2,
                        help="model copies per variant, timed in every round and averaged")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last layout (default: on CUDA only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--steps-per-sample", type=int, default=None,
                        help="steps timed together between two synchronizations (default: 10 on CUDA, "
                             "where a step only queues work, so that the device never waits for the "
                             "host between them; 1 on the CPU)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    for spec in args.rules:
        try:
            parse_variant(spec)
        except ValueError as error:
            parser.error(f"--rules {spec}: {error}")
    for option in ("rounds", "copies", "steps_per_sample"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    steps_per_sample = args.steps_per_sample or (10 if device.type == "cuda" else 1)
    print(f"# torch {torch.__version__}, {device} ({name}), {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, scale={args.scale}, {args.rounds} rounds x {args.copies} copies, "
          f"channels_last={channels_last}, compile={args.compile}, {steps_per_sample} step(s) per sample")
    rows = []
    for dtype in args.dtype:
        for arch in args.models:
            rows += bench_model(arch, args.rules, args.scale, args.rounds, args.warmup,
                                args.batch_size, device, dtype, channels_last, args.compile,
                                args.copies, steps_per_sample)
            print(f"\n{arch} ({dtype})\n{'variant':>8} {'median ms':>10} {'ratio':>7} {'img/s':>9}")
            for row in rows:
                if row["model"] == arch and row["dtype"] == dtype:
                    print(f"{row['variant']:>8} {row['median_ms']:10.1f} {row['ratio']:7.3f} "
                          f"{row['images_per_s']:9.0f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(device=str(device), device_name=name, torch=torch.__version__,
                           threads=torch.get_num_threads(), rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
