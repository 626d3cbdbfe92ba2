"""A rule is one record in rules.py: a copy of the package with one record added there (a rule
with its own options and its own work between steps) trains through the CLI, is accepted by a
study with its options, and gets a figure colour, with no other file touched."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import feedback_alignment
from feedback_alignment import data

NEW_RULE = '''
        Rule("shrink", _fixed_random, "fixed", sign_concordant=False, fixed_direction=True,
             description="fixed random B, multiplied by factor every `every` steps",
             options=(Option("factor", 0.9, "B's factor", minimum=0.0),
                      Option("every", 1, "steps between shrinks", minimum=1)),
             after_step=_shrink),
'''
SHRINK = '''

def _shrink(model, step: int, options: dict) -> None:
    from .convert import feedback_layers

    if step % options["every"] == 0:
        for _, layer in feedback_layers(model):
            layer.feedback_direction.mul_(options["factor"])
'''

# Run by the copy's Python: train (the CLI's main, given the rest of argv), then check.
TRAIN_AND_CHECK = textwrap.dedent('''
    import sys, torch
    import feedback_alignment as fa
    from feedback_alignment import figures, train
    train.main(sys.argv[2:])
    from feedback_alignment.models import build_model
    from feedback_alignment.study import Study

    assert "shrink" in fa.RULES and "shrink" in figures.RULE_COLORS
    study = Study(dict(experiment="x", datasets={"digits": {}}, archs={"net": {"arch": "convnet"}},
                       variants={"half": {"rule_options": {"factor": 0.5, "every": 2}}},
                       grid=[{"datasets": ["digits"], "archs": ["net"], "rules": ["shrink"], "variants": ["half"]}],
                       seeds=[0]))
    assert "--rule-option factor=0.5 --rule-option every=2" in study.train_flags("digits", "net", "half")
    # Four steps with a shrink every second one: B is a quarter of the same draw under fa.
    torch.manual_seed(0)
    reference = fa.convert(build_model("convnet", 10, 1, 8, True, 2, 4), rule="fa", seed=0).state_dict()
    trained = torch.load(sys.argv[1], weights_only=True)["model"]
    directions = [key for key in trained if key.endswith("feedback_direction")]
    assert len(directions) == 3
    for key in directions:
        torch.testing.assert_close(trained[key], 0.25 * reference[key], rtol=0, atol=0)
    print("ok")
''')


@pytest.mark.slow(seconds=12)
def test_a_rule_added_in_rules_py_alone_trains_with_its_options(tmp_path):
    package = tmp_path / "src" / "feedback_alignment"
    shutil.copytree(Path(feedback_alignment.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    rules = (package / "rules.py").read_text()
    registry_end = "    )\n}\n\nRULES: tuple[str, ...] = tuple(_REGISTRY)"
    assert rules.count(registry_end) == 1
    rules = rules.replace(registry_end, NEW_RULE.lstrip("\n") + registry_end)
    rules = rules.replace("\n\n_REGISTRY: dict[str, Rule] = {", SHRINK + "\n\n_REGISTRY: dict[str, Rule] = {")
    (package / "rules.py").write_text(rules)
    env = dict(os.environ, PYTHONPATH=str(package.parent))
    data.prepare_digits(tmp_path / "d.pt")  # the copy reads the same cache
    check = subprocess.run([sys.executable, "-c", TRAIN_AND_CHECK, str(tmp_path / "run" / "checkpoint.pt"),
        "--dataset", "digits", "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "run"),
        "--arch", "convnet", "--depth", "2", "--width", "4", "--rule", "shrink", "--rule-option", "factor=0.5",
        "--rule-option", "every=2", "--epochs", "1", "--batch-size", "32", "--max-batches", "4"],
        env=env, capture_output=True, text=True, timeout=300)
    assert check.stdout.strip() == "ok", check.stderr[-2000:]
