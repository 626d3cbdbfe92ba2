"""The training settings of a run, declared once.

The train CLI's flags, the defaults a study config's `training` block falls back on, and the
flags the workflow writes for each run all come from `TRAINING` below (the config schema states
the same defaults for its readers; a test holds the two equal).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

OPTIMIZERS = ("sgd", "batch_manhattan", "adam")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Setting:
    """One training setting: its name in configs (the flag is --name-with-dashes), default, type
    (int, float, str, bool, or list for a list of ints) and meaning."""
    name: str
    default: object
    kind: type
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


TRAINING: tuple[Setting, ...] = (
    Setting("epochs", 20, int, "training epochs"),
    Setting("batch_size", 128, int, "images per optimizer step (over all processes)"),
    Setting("optimizer", "sgd", str, "sgd, batch_manhattan (sign of the momentum update) or adam", OPTIMIZERS),
    Setting("lr", 0.1, float, "learning rate"),
    Setting("momentum", 0.9, float, "SGD momentum"),
    Setting("weight_decay", 0.0, float, "L2 weight decay"),
    Setting("lr_milestones", [], list, "epochs at which lr *= lr-gamma"),
    Setting("lr_gamma", 0.1, float, "learning-rate factor at each milestone"),
    Setting("max_batches", None, int, "smoke runs only: stop each epoch after this many batches"),
    Setting("alignment_every", 0, int, "every N steps (and before the first), log per-layer alignment with "
            "backprop on a fixed validation batch to alignment.csv; 0 = never"),
    Setting("precision", "auto", str, "bf16 = autocast to bfloat16; auto = bf16 on CUDA, fp32 on CPU", PRECISIONS),
    Setting("compile", False, bool, "torch.compile the converted model (under torchrun: the DDP model)"),
)


def defaults() -> dict:
    return {setting.name: setting.default for setting in TRAINING}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings as flags of the train CLI."""
    for setting in TRAINING:
        if setting.kind is bool:
            parser.add_argument(setting.flag, action=argparse.BooleanOptionalAction, default=setting.default,
                                help=setting.help)
        elif setting.kind is list:
            parser.add_argument(setting.flag, type=int, nargs="*", default=list(setting.default), help=setting.help)
        else:
            parser.add_argument(setting.flag, type=setting.kind, default=setting.default, choices=setting.choices,
                                help=setting.help)


def cli_flags(values: dict) -> list[str]:
    """The train CLI's flags for resolved settings `values` (every setting, spelled out; a setting
    without a value, or an empty list, is left to the CLI's default, which is the same)."""
    flags = []
    for setting in TRAINING:
        value = values[setting.name]
        if setting.kind is bool:
            flags.append(setting.flag if value else "--no-" + setting.flag[2:])
        elif setting.kind is list:
            if value:
                flags.append(" ".join([setting.flag, *map(str, value)]))
        elif value is not None:
            flags.append(f"{setting.flag} {value}")
    return flags
