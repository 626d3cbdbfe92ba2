# Config validation and the grid of runs. Everything the rules need is computed here, once.
import itertools
import os
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.utils import validate

import feedback_alignment
import feedback_alignment.settings

# Jobs run `python -m feedback_alignment ...` with the interpreter that runs Snakemake, also
# when Snakemake was started as .venv/bin/snakemake without activating the environment.
shell.prefix(f'export PATH="{Path(sys.executable).parent}:$PATH"; ')

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"


def _config_error(key, message):
    raise WorkflowError(f"config key {key}: {message}")


def _check_schema(config):
    """Name the offending key, not just the schema rule it broke."""
    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        _config_error(key, error.message)


_check_schema(config)
validate(config, str(SCHEMA))  # fills in the schema's defaults

TRAINING_DEFAULTS = feedback_alignment.settings.defaults()
RESOURCES = {"threads": 1, "gpus": 0, "runs_per_gpu": 1, "mem_mb": 4000, "runtime": 60,
             **config.get("resources", {})}
# A job given GPUs trains on CUDA or stops; it never falls back to the CPU by itself.
RESOURCES.setdefault("device", "cuda" if RESOURCES["gpus"] > 0 else "cpu")
DATA_DIR = config["data_dir"]
EXPERIMENT = config["experiment"]
RESULTS = f"results/{EXPERIMENT}"


def _check_names(config):
    """Cross-references the schema cannot express: names used in the grid must be defined."""
    for index, block in enumerate(config["grid"]):
        where = f"grid[{index}]"
        for dataset in block["datasets"]:
            if dataset not in config["datasets"]:
                _config_error(f"{where}.datasets", f"{dataset!r} is not defined under datasets")
        for arch in block["archs"]:
            if arch not in config["archs"]:
                _config_error(f"{where}.archs", f"{arch!r} is not defined under archs")
        for rule_name in block["rules"]:
            if rule_name not in feedback_alignment.RULES:
                _config_error(f"{where}.rules", f"unknown rule {rule_name!r}; choose from "
                              f"{', '.join(feedback_alignment.RULES)}")
        for variant in block["variants"]:
            if variant not in config["variants"]:
                _config_error(f"{where}.variants", f"{variant!r} is not defined under variants")
    for name, variant in config["variants"].items():
        scale = variant.get("scale", "none")
        if scale not in feedback_alignment.SCALES:
            _config_error(f"variants.{name}.scale", f"unknown scale {scale!r}; choose from "
                          f"{', '.join(feedback_alignment.SCALES)}")
    for index, block in enumerate(config["grid"]):  # a variant's scale and rule options, per rule
        for rule_name, variant in itertools.product(block["rules"], block["variants"]):
            rule_spec = feedback_alignment.get_rule(rule_name)  # ("rule" is a Snakemake keyword)
            try:
                feedback_alignment.rules.check_scale(config["variants"][variant].get("scale", "none"), rule_spec)
            except ValueError as error:
                _config_error(f"grid[{index}]", f"variant {variant!r}: {error}")
            try:
                rule_spec.resolve_options(config["variants"][variant].get("rule_options", {}))
            except ValueError as error:
                _config_error(f"variants.{variant}.rule_options", f"in grid[{index}]: {error}")
    if "imagenet" in config["datasets"]:
        path = config["datasets"]["imagenet"]["path"]
        if not os.path.isdir(path):
            _config_error("datasets.imagenet.path", f"{path!r} does not exist or is not a directory")


_check_names(config)


def _runs(config):
    seen = {}
    for block in config["grid"]:
        for dataset, arch, rule_name, variant in itertools.product(
                block["datasets"], block["archs"], block["rules"], block["variants"]):
            for seed in config["seeds"]:
                seen[(dataset, arch, rule_name, variant, seed)] = None
    return list(seen)


RUNS = _runs(config)

IMAGE_SIZES = {"digits": (1, 8), "cifar10": (3, 32)}  # (channels, side); imagenet is resized


def _check_models(config):
    """Combinations that cannot run, found before any job starts: build each (dataset, arch,
    variant) model on the meta device (no memory, no time) and check crops and excluded names."""
    import torch
    from feedback_alignment.models import build_model

    checked = set()
    for dataset, arch, _, variant, _ in RUNS:
        if (dataset, arch, variant) in checked:
            continue
        checked.add((dataset, arch, variant))
        s = resolve_settings(dataset, arch, variant)
        channels, side = IMAGE_SIZES.get(dataset, (3, s.get("crop", 224)))
        crop = s.get("crop", side)
        if crop > side + 2 * s.get("pad", 0):
            _config_error(f"archs.{arch}.augment.crop", f"crop {crop} is larger than the "
                          f"{side}x{side} {dataset} images plus padding")
        try:
            with torch.device("meta"):
                model = build_model(s["arch"], 10, channels, crop, s["batch_norm"], s["depth"], s["width"])
        except ValueError as error:
            _config_error(f"archs.{arch} with variants.{variant} on {dataset}", str(error))
        names = {name for name, _ in model.named_modules()}
        for name in s["exclude"]:
            if name not in names:
                _config_error(f"variants.{variant}.exclude", f"{name!r} is not a module of {s['arch']}")



def run_dir(dataset, arch, rule, variant, seed):
    return f"{RESULTS}/runs/{dataset}/{arch}/{rule}-{variant}/seed{seed}"


def data_file(dataset):
    return f"{DATA_DIR}/{dataset}.json" if dataset == "imagenet" else f"{DATA_DIR}/{dataset}.pt"


def resolve_settings(dataset_name, arch_name, variant_name):
    """The resolved settings of one run: schema defaults < training < arch < variant."""
    arch = config["archs"][arch_name]
    variant = config["variants"][variant_name]
    dataset = config["datasets"][dataset_name]
    training = {**TRAINING_DEFAULTS, **config.get("training", {}), **arch.get("training", {})}
    training.update({k: variant[k] for k in ("optimizer", "lr") if k in variant})
    augment = {**dataset.get("augment", {}), **arch.get("augment", {})}
    return dict(
        arch=arch["arch"], depth=arch.get("depth", 8), width=arch.get("width", 32),
        batch_norm=variant.get("batch_norm", arch.get("batch_norm", True)),
        scale=variant.get("scale", "none"), exclude=variant.get("exclude", []),
        constrain_weight_norm=variant.get("constrain_weight_norm", False),
        rule_options=variant.get("rule_options", {}), **training, **augment)


def train_flags(wildcards):
    """The train CLI's flags for one run, spelled out so the log shows the exact command."""
    s = resolve_settings(wildcards.dataset, wildcards.arch, wildcards.variant)
    flags = [f"--arch {s['arch']}", f"--arch-label {wildcards.arch}", f"--variant {wildcards.variant}",
             f"--depth {s['depth']}", f"--width {s['width']}",
             "--batch-norm" if s["batch_norm"] else "--no-batch-norm",
             f"--scale {s['scale']}",
             "--constrain-weight-norm" if s["constrain_weight_norm"] else "--no-constrain-weight-norm",
             *feedback_alignment.settings.cli_flags(s)]
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


def launcher(gpus: int, threads: int) -> str:
    """How a training job starts: one process, or one per GPU through torchrun (data parallel;
    the CLI reads its rank from torchrun's environment), the job's threads split among them."""
    workers = f" --workers {RESOURCES['workers']}" if "workers" in RESOURCES else ""
    if gpus <= 1:
        return (f"python -m feedback_alignment train --threads {threads} --runs-per-gpu "
                f"{RESOURCES['runs_per_gpu']}{workers}")
    return (f"torchrun --standalone --nproc-per-node {gpus} -m feedback_alignment train "
            f"--threads {max(1, threads // gpus)}{workers}")


def prepare_flags(wildcards):
    settings = config["datasets"][wildcards.dataset]
    if wildcards.dataset == "cifar10":
        return f"--url {settings['url']} --md5 {settings['md5']} --val-size {settings['val_size']}"
    if wildcards.dataset == "imagenet":
        return f"--path {settings['path']} --val-size {settings['val_size']}"
    return f"--val-size {settings['val_size']}"


def all_evaluations():
    return [f"{run_dir(*run)}/evaluation.json" for run in RUNS]


_check_models(config)
