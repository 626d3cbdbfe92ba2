"""A study: its config checked, its grid of runs, and each run's path, settings and command line.

A study config (config/*.yaml, the schema in resources/config.schema.yaml) names datasets,
architectures, technique variants and a grid of blocks; every block trains the product of its
lists for every seed. The workflow's rules ask a `Study` for everything they need; all of it
works, and is tested, without Snakemake.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from . import settings
from .data import DataError
from .rules import RULES, SCALES, check_scale, get_rule
from .sources import OptionError, get_kind
from .tuning import RULE_OPTION, point_items, point_label

SCHEMA_PATH = Path(__file__).parent / "resources" / "config.schema.yaml"


class ConfigError(ValueError):
    """A study that cannot run, found before any job starts; the message names the config key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key {key}: {message}")


@dataclass(frozen=True)
class Run:
    """One training run of the grid."""
    dataset: str
    arch: str
    rule: str
    variant: str
    seed: int
    point: str = ""  # a tuning run's point of the sweep, e.g. "lr=0.05"; "" for the study's own runs

    @property
    def group(self) -> tuple[str, str, str, str]:
        """What tuning selects a point for: (dataset, arch, rule, variant)."""
        return self.dataset, self.arch, self.rule, self.variant


class Study:
    """A checked study config. `check_models` builds every (dataset, arch, variant) model on the
    meta device to find combinations that cannot run (no memory, no time)."""

    def __init__(self, config: dict, check_models: bool = True):
        schema = yaml.safe_load(SCHEMA_PATH.read_text())
        config = copy.deepcopy(config)
        _check_schema(config, schema)
        _fill_defaults(config, schema)
        self.kinds = _resolve_datasets(config)
        _check_names(config)
        self.config = config
        self.experiment: str = config["experiment"]
        self.results = f"results/{self.experiment}"
        self.data_dir: str = config["data_dir"]
        self.resources = dict(config["resources"])
        # A job given GPUs trains on CUDA or stops; it never falls back to the CPU by itself.
        self.resources.setdefault("device", "cuda" if self.resources["gpus"] > 0 else "cpu")
        self.runs = _grid(config)
        self.groups = list(dict.fromkeys(run.group for run in self.runs))  # what tuning selects for
        tuning = config.get("tuning") or {}
        self.sweep: dict[str, list] = tuning.get("sweep", {})
        self.tuning_seeds: list[int] = tuning.get("seeds", [])
        _check_sweep(config, schema)
        self.tuning_runs = [Run(*group, seed, point) for group in self.groups
                            for point in self.points(group[2]) for seed in self.tuning_seeds]
        if check_models:
            self._check_models()

    @classmethod
    def from_file(cls, path: str | os.PathLike, check_models: bool = True) -> "Study":
        return cls(yaml.safe_load(Path(path).read_text()), check_models)

    def run_dir(self, run: Run) -> str:
        if run.point:
            return f"{self.group_dir(*run.group)}/{run.point}/seed{run.seed}"
        return f"{self.results}/runs/{run.dataset}/{run.arch}/{run.rule}-{run.variant}/seed{run.seed}"

    def group_dir(self, dataset: str, arch: str, rule: str, variant: str) -> str:
        """Where a group's tuning runs and its selection go."""
        return f"{self.results}/tuning/{dataset}/{arch}/{rule}-{variant}"

    def points(self, rule: str) -> list[str]:
        """The sweep's points for a rule, as labels ("lr=0.05,momentum=0.9"): the grid of the
        swept values, over the rule options only of rules that have them."""
        keys = [key for key in self.sweep if _applies(key, rule)]
        grid = itertools.product(*(self.sweep[key] for key in keys))
        return [point_label(zip(keys, values)) for values in grid]

    def point_values(self, point: str) -> dict:
        """A point's label as {key: value}, each value as the config gave it."""
        return {key: next(value for value in self.sweep[key] if str(value) == text)
                for key, text in point_items(point)}

    def tuning_results(self, dataset: str, arch: str, rule: str, variant: str) -> list[str]:
        return [f"{self.run_dir(run)}/result.json" for run in self.tuning_runs
                if run.group == (dataset, arch, rule, variant)]

    def selection_file(self, dataset: str, arch: str, rule: str, variant: str) -> str:
        return f"{self.group_dir(dataset, arch, rule, variant)}/selected.json"

    def selection_files(self) -> list[str]:
        return [self.selection_file(*group) for group in self.groups] if self.sweep else []

    def evaluations(self) -> list[str]:
        return [f"{self.run_dir(run)}/evaluation.json" for run in self.runs]

    def data_file(self, dataset: str) -> str:
        # A streamed dataset (imagenet) stays in its folder; the prepare step describes its splits.
        return f"{self.data_dir}/{dataset}.{'json' if self.streams(dataset) else 'pt'}"

    def streams(self, dataset: str) -> bool:
        """Whether a dataset is read through DataLoader workers (a manifest) or from the tensor cache."""
        return self.kinds[dataset].streams(self.config["datasets"][dataset])

    def settings(self, dataset: str, arch: str, variant: str, point: str = "") -> dict:
        """The resolved settings of a run: declared defaults < training < arch < variant < the
        tuning run's point."""
        arch_config = self.config["archs"][arch]
        variant_config = self.config["variants"][variant]
        training = {**settings.defaults(), **self.config["training"], **arch_config.get("training", {})}
        training.update({key: variant_config[key] for key in ("optimizer", "lr") if key in variant_config})
        augment = {**self.config["datasets"][dataset].get("augment", {}), **arch_config.get("augment", {})}
        resolved = dict(
            arch=arch_config["arch"], depth=arch_config.get("depth", 8), width=arch_config.get("width", 32),
            batch_norm=variant_config.get("batch_norm", arch_config.get("batch_norm", True)),
            scale=variant_config.get("scale", "none"), exclude=variant_config.get("exclude", []),
            constrain_weight_norm=variant_config.get("constrain_weight_norm", False),
            rule_options=dict(variant_config.get("rule_options", {})), **training, **augment)
        for key, value in self.point_values(point).items():
            if key.startswith(RULE_OPTION):
                resolved["rule_options"][key[len(RULE_OPTION):]] = value
            else:
                resolved[key] = value
        return resolved

    def train_flags(self, dataset: str, arch: str, variant: str, point: str = "") -> str:
        """The train CLI's flags for a run, spelled out so the log shows the exact command."""
        s = self.settings(dataset, arch, variant, point)
        flags = [f"--arch {s['arch']}", f"--arch-label {arch}", f"--variant {variant}",
                 f"--depth {s['depth']}", f"--width {s['width']}",
                 "--batch-norm" if s["batch_norm"] else "--no-batch-norm",
                 f"--scale {s['scale']}",
                 "--constrain-weight-norm" if s["constrain_weight_norm"] else "--no-constrain-weight-norm",
                 *settings.cli_flags(s)]
        if s["exclude"]:
            flags.append("--exclude " + " ".join(s["exclude"]))
        flags += [f"--rule-option {key}={value}" for key, value in s["rule_options"].items()]
        if "crop" in s:
            flags.append(f"--crop {s['crop']}")
        if s.get("pad"):
            flags.append(f"--pad {s['pad']}")
        if s.get("flip"):
            flags.append("--flip")
        return " ".join(flags)

    def launcher(self) -> str:
        """How a training job starts: one process, or one per GPU through torchrun (data parallel;
        the CLI reads its rank from torchrun's environment), the job's threads split among them."""
        gpus, threads = self.resources["gpus"], self.resources["threads"]
        workers = f" --workers {self.resources['workers']}" if "workers" in self.resources else ""
        if gpus <= 1:
            return (f"python -m feedback_alignment train --threads {threads} --runs-per-gpu "
                    f"{self.resources['runs_per_gpu']}{workers}")
        return (f"torchrun --standalone --nproc-per-node {gpus} -m feedback_alignment train "
                f"--threads {max(1, threads // gpus)}{workers}")

    def dataset_pattern(self, streams: bool) -> str:
        """A regular expression matching the names of the datasets that are (not) streamed: which
        of the workflow's prepare rules makes each."""
        names = [re.escape(name) for name in self.kinds if self.streams(name) == streams]
        return "|".join(names) or "(?!)"  # (?!) matches nothing

    def prepare_flags(self, dataset: str) -> str:
        """The prepare CLI's flags: the dataset's name, kind and the options the config sets."""
        flags = [f"--name {dataset} --kind {self.kinds[dataset].name}"]
        for key, value in self.config["datasets"][dataset].items():
            if key in ("kind", "augment") or value is None:
                continue
            if isinstance(value, dict):  # md5 by file
                value = " ".join(shlex.quote(f"{file}={digest}") for file, digest in value.items())
            else:
                value = shlex.quote(str(value))
            flags.append(f"--{key.replace('_', '-')} {value}")
        return " ".join(flags)

    def _check_models(self) -> None:
        """Crops larger than the images, architectures that cannot take the images, excluded
        names that are not modules: each (dataset, arch, variant) model built on the meta device."""
        from .models import ShapesOnly, build_model

        for dataset, arch, variant in dict.fromkeys((r.dataset, r.arch, r.variant) for r in self.runs):
            s = self.settings(dataset, arch, variant)
            kind = self.kinds[dataset]
            options = self.config["datasets"][dataset]
            shape = (3, s.get("crop") or options.get("image_size") or 224) if self.streams(dataset) else kind.shape(options)
            if shape is None:  # an image folder's images are only known once prepared
                continue
            channels, side = shape
            crop = s.get("crop", side)
            if crop > side + 2 * s.get("pad", 0):
                raise ConfigError(f"archs.{arch}.augment.crop",
                                  f"crop {crop} is larger than the {side}x{side} {dataset} images plus padding")
            try:
                with ShapesOnly():
                    model = build_model(s["arch"], 10, channels, crop, s["batch_norm"], s["depth"], s["width"])
            except ValueError as error:
                raise ConfigError(f"archs.{arch} with variants.{variant} on {dataset}", str(error)) from None
            names = {name for name, _ in model.named_modules()}
            for name in s["exclude"]:
                if name not in names:
                    raise ConfigError(f"variants.{variant}.exclude", f"{name!r} is not a module of {s['arch']}")


def _check_schema(config: dict, schema: dict) -> None:
    """Name the offending key, not just the schema rule it broke."""
    errors = jsonschema.Draft202012Validator(schema).iter_errors(config)
    error = min(errors, key=lambda e: [str(p) for p in e.absolute_path], default=None)
    if error is not None:
        raise ConfigError(".".join(str(p) for p in error.absolute_path) or "(top level)", error.message)


def _fill_defaults(instance: dict, schema: dict) -> None:
    """The schema's defaults for keys a config leaves out, following nested `properties` but not
    `$ref`s: an arch's or variant's `training` names only what it changes, so it must not gain the
    training defaults that would then override the study's `training` block."""
    for key, subschema in schema.get("properties", {}).items():
        if "default" in subschema and key not in instance:
            instance[key] = copy.deepcopy(subschema["default"])
        if isinstance(instance.get(key), dict) and "properties" in subschema:
            _fill_defaults(instance[key], subschema)


def _resolve_datasets(config: dict) -> dict:
    """Each dataset's kind, and its options with the kind's defaults written into the config."""
    kinds = {}
    for name, dataset in config["datasets"].items():
        try:
            kinds[name] = get_kind(name, dataset)
        except DataError as error:
            raise ConfigError(f"datasets.{name}.kind", str(error)) from None
        try:
            options = kinds[name].resolve(name, {k: v for k, v in dataset.items() if k not in ("kind", "augment")})
        except OptionError as error:
            raise ConfigError(f"datasets.{name}.{error.option}", str(error)) from None
        dataset.update(options, kind=kinds[name].name)
    return kinds


def _check_names(config: dict) -> None:
    """Cross-references the schema cannot express: names used in the grid are defined, and each
    variant's scale and rule options suit every rule it runs with."""
    for index, block in enumerate(config["grid"]):
        where = f"grid[{index}]"
        for kind in ("datasets", "archs", "variants"):
            for name in block[kind]:
                if name not in config[kind]:
                    raise ConfigError(f"{where}.{kind}", f"{name!r} is not defined under {kind}")
        for name in block["rules"]:
            if name not in RULES:
                raise ConfigError(f"{where}.rules", f"unknown rule {name!r}; choose from {', '.join(RULES)}")
    for name, variant in config["variants"].items():
        if variant.get("scale", "none") not in SCALES:
            raise ConfigError(f"variants.{name}.scale",
                              f"unknown scale {variant['scale']!r}; choose from {', '.join(SCALES)}")
    for index, block in enumerate(config["grid"]):
        for rule_name, name in itertools.product(block["rules"], block["variants"]):
            variant, rule = config["variants"][name], get_rule(rule_name)
            try:
                check_scale(variant.get("scale", "none"), rule)
            except ValueError as error:
                raise ConfigError(f"grid[{index}]", f"variant {name!r}: {error}") from None
            try:
                rule.resolve_options(variant.get("rule_options", {}))
            except ValueError as error:
                raise ConfigError(f"variants.{name}.rule_options", f"in grid[{index}]: {error}") from None
    for name, dataset in config["datasets"].items():
        if dataset.get("path") is not None and not os.path.isdir(dataset["path"]):
            raise ConfigError(f"datasets.{name}.path", f"{dataset['path']!r} does not exist or is not a directory")


def _applies(key: str, rule: str) -> bool:
    """Whether a sweep key is a setting of `rule`'s runs (a rule option only of rules that have it)."""
    return not key.startswith(RULE_OPTION) or key[len(RULE_OPTION):] in {o.name for o in get_rule(rule).options}


def _check_sweep(config: dict, schema: dict) -> None:
    """Every swept key is a training setting or some grid rule's option, every value one it takes,
    and no variant fixes a swept setting (the sweep would silently not apply to it)."""
    sweep = (config.get("tuning") or {}).get("sweep", {})
    rules = {rule for block in config["grid"] for rule in block["rules"]}
    variants = {variant for block in config["grid"] for variant in block["variants"]}
    for key, values in sweep.items():
        where = f"tuning.sweep.{key}"
        if key in settings.defaults():
            validator = jsonschema.Draft202012Validator(schema["$defs"]["training"]["properties"][key])
            for index, value in enumerate(values):
                error = next(validator.iter_errors(value), None)
                if error is not None:
                    raise ConfigError(f"{where}[{index}]", error.message)
            fixing = sorted(v for v in variants if key in config["variants"][v])
        elif key.startswith(RULE_OPTION) and any(_applies(key, rule) for rule in rules):
            name = key[len(RULE_OPTION):]
            for rule in sorted(r for r in rules if _applies(key, r)):
                option = {o.name: o for o in get_rule(rule).options}[name]
                for index, value in enumerate(values):
                    try:
                        option.check(rule, value)
                    except ValueError as error:
                        raise ConfigError(f"{where}[{index}]", str(error)) from None
            fixing = sorted(v for v in variants if name in config["variants"][v].get("rule_options", {}))
        else:
            raise ConfigError(where, "not a training setting nor an option of a rule in the grid; sweep one of "
                              f"{', '.join(settings.defaults())} or {RULE_OPTION}NAME")
        if fixing:
            raise ConfigError(where, f"variant {fixing[0]!r} fixes this setting; leave it to the sweep "
                              "or take it out of the sweep")


def _grid(config: dict) -> list[Run]:
    """Every run of every block, each once (blocks may overlap), in the order the blocks name them."""
    runs = {}
    for block in config["grid"]:
        for dataset, arch, rule, variant in itertools.product(
                block["datasets"], block["archs"], block["rules"], block["variants"]):
            for seed in config["seeds"]:
                runs[Run(dataset, arch, rule, variant, seed)] = None
    return list(runs)
