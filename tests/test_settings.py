"""Training settings declared once (settings.py): the CLI, the config schema and the workflow's
flags agree with that declaration."""
from pathlib import Path

import yaml

from feedback_alignment import settings
from feedback_alignment.train import build_parser

SCHEMA = Path(__file__).resolve().parents[1] / "src" / "feedback_alignment" / "resources" / "config.schema.yaml"
REQUIRED = ["--dataset", "digits", "--data", "d.pt", "--out", "o", "--arch", "convnet", "--rule", "fa"]


def test_the_schemas_training_defaults_are_the_declared_ones():
    schema = yaml.safe_load(SCHEMA.read_text())["$defs"]["training"]["properties"]
    assert {name: spec.get("default") for name, spec in schema.items()} == settings.defaults()


def test_the_cli_defaults_are_the_declared_ones():
    parsed = vars(build_parser().parse_args(REQUIRED))
    assert {name: parsed[name] for name in settings.defaults()} == settings.defaults()


def test_the_workflows_flags_give_the_cli_back_every_value():
    values = dict(epochs=3, batch_size=7, optimizer="adam", lr=0.5, momentum=0.5, weight_decay=1e-4,
                  lr_milestones=[2, 5], lr_gamma=0.5, max_batches=4, alignment_every=9, precision="bf16",
                  compile=True)
    assert values.keys() == settings.defaults().keys()  # every setting changed from its default
    flags = " ".join(settings.cli_flags(values)).split()
    parsed = vars(build_parser().parse_args(REQUIRED + flags))
    assert {name: parsed[name] for name in values} == values
    # and the defaults, spelled out, parse back to the defaults
    flags = " ".join(settings.cli_flags(settings.defaults())).split()
    parsed = vars(build_parser().parse_args(REQUIRED + flags))
    assert {name: parsed[name] for name in values} == settings.defaults()


def test_the_schemas_dataset_keys_are_the_kinds_options():
    # The schema types each key; sources.py says which kind takes it and its default. Neither may
    # name a key the other lacks, and the schema holds no defaults (they differ by kind).
    from feedback_alignment.sources import KINDS

    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["datasets"]["additionalProperties"]["properties"]
    options = {option.name for kind in KINDS.values() for option in kind.options}
    assert set(schema) == options | {"kind", "augment"}
    assert not [key for key, spec in schema.items() if "default" in spec]
