"""The study in-process (study.py): config checks that name the key, the grid of runs, each run's
path, resolved settings and command line. tests/test_workflow.py runs the same through Snakemake."""
import copy
import shlex

import pytest
import yaml

from conftest import REPO, TINY
from feedback_alignment import settings
from feedback_alignment.study import ConfigError, Run, Study
from feedback_alignment.prepare import build_parser as prepare_parser
from feedback_alignment.train import build_parser

def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["grid"][1]["rules"].append("xyz"), "grid[1].rules"),
    (lambda c: c["grid"][0]["archs"].append("nonet"), "grid[0].archs"),
    (lambda c: c["grid"][1]["variants"].append("bn"), "grid[1].variants"),
    (lambda c: c["grid"][0]["datasets"].append("cifar10"), "grid[0].datasets"),
    (lambda c: c["training"].update(lr=-0.1), "training.lr"),
    (lambda c: c.update(seeds=[]), "seeds"),
    (lambda c: c.update(seeds="0"), "seeds"),
    (lambda c: c.update(seeds=[0, 0.5]), "seeds.1"),
    (lambda c: c.pop("grid"), "(top level)"),
    (lambda c: c["datasets"].update(imagenet={"path": "/no/such/imagenet"}), "datasets.imagenet.path"),
    (lambda c: c["datasets"].update(imagenet={}), "datasets.imagenet.path"),
    (lambda c: c["datasets"].update(mine={"kind": "imagefolder", "path": "/no/such/folder"}), "datasets.mine.path"),
    (lambda c: c["datasets"].update(mine={"kind": "imagefolder"}), "datasets.mine.path"),
    (lambda c: c["datasets"].update(mine={"kind": "mnits"}), "datasets.mine.kind"),
    (lambda c: c["datasets"].update(mine={}), "datasets.mine.kind"),  # a free name needs a kind
    (lambda c: c["datasets"].update(mnist={"url": "http://127.0.0.1:1/"}), "datasets.mnist.url"),  # mnist: mirror
    (lambda c: c["datasets"].update(mnist={"md5": "not hex"}), "datasets.mnist.md5"),
    (lambda c: c["datasets"].update(mnist={"size": 3}), "datasets.mnist"),  # the schema knows no "size"
    (lambda c: c["datasets"].update({"my data": {"kind": "digits"}}), "datasets"),  # a name paths can carry
    (lambda c: c["variants"]["raw"].update(scale="huge"), "variants.raw.scale"),
    (lambda c: c["training"].update(learning_rate=0.1), "training"),
    (lambda c: c["archs"]["net"].update(training={"epoch": 3}), "archs.net.training"),
    (lambda c: c["variants"]["raw"].update(exclude=["clasifier"]), "variants.raw.exclude"),
    (lambda c: c["archs"]["net"].update(augment={"crop": 12}), "archs.net.augment.crop"),
    (lambda c: c["archs"].update(net={"arch": "resnet18"}), "archs.net with variants.exact on digits"),
    (lambda c: c["archs"]["net"].update(arch="nonet"), "archs.net with variants.exact on digits"),
    (lambda c: c["grid"][1]["rules"].append("kp"), "grid[1]"),  # kp takes no scale; "matched" has one
    (lambda c: c["variants"]["raw"].update(rule_options={"lr": 0.1}), "variants.raw.rule_options"),  # usf: none
    (lambda c: c["variants"]["raw"].update(rule_options={"lr": "fast"}), "variants.raw.rule_options.lr"),
    (lambda c: c.update(resources={"runs_per_gpu": 0}), "resources.runs_per_gpu"),
])
def test_a_config_that_cannot_run_is_refused_naming_the_key(edit, key):
    config = copy.deepcopy(TINY)
    edit(config)
    with pytest.raises(ConfigError) as error:
        Study(config)
    assert str(error.value).startswith(f"config key {key}: ") and "\n" not in str(error.value)


def test_the_config_itself_is_left_as_given():
    config = copy.deepcopy(TINY)
    Study(config)
    assert config == TINY


def test_the_grid_is_every_runs_product_each_once_in_block_order():
    config = copy.deepcopy(TINY)
    config["grid"].append({"datasets": ["digits"], "archs": ["net"], "rules": ["usf", "bp"], "variants": ["raw"]})
    runs = Study(config).runs
    assert runs == [Run("digits", "net", rule, variant, seed)
                    for rule, variant in (("bp", "exact"), ("usf", "raw"), ("usf", "matched"), ("bp", "raw"))
                    for seed in (0, 1)]


@pytest.mark.parametrize("name, runs, tuning_runs", [("config.yaml", 45, 15 * 3), ("depth.yaml", 324, 96 * 3 + 12 * 6),
                                                     ("cifar10.yaml", 3 * 85, 85 * 4), ("mnist.yaml", 3 * 24, 24 * 3),
                                                     ("cifar100.yaml", 3 * 24, 24 * 2)])
def test_the_shipped_studies_have_their_documented_size(name, runs, tuning_runs):
    study = Study(shipped(name))
    assert (len(study.runs), len(study.tuning_runs)) == (runs, tuning_runs)


def test_paths_of_a_run_and_its_data(tmp_path):
    study = Study(dict(TINY, datasets={"digits": {}, "pets": {"kind": "imagefolder", "path": str(tmp_path)},
                                       "inet": {"kind": "imagenet", "path": str(tmp_path)},
                                       "big": {"kind": "imagefolder", "path": str(tmp_path), "stream": True}}))
    assert study.run_dir(Run("digits", "net", "usf", "raw", 1)) == "results/tiny/runs/digits/net/usf-raw/seed1"
    assert study.evaluations()[0] == "results/tiny/runs/digits/net/bp-exact/seed0/evaluation.json"
    assert study.data_file("digits") == "resources/data/digits.pt"
    assert study.data_file("pets") == "resources/data/pets.pt"  # decoded into a cache
    assert study.data_file("inet") == "resources/data/inet.json"  # streamed: a manifest of the folder
    assert study.data_file("big") == "resources/data/big.json"
    # Which prepare rule makes which file: the streamed names, and the cached ones.
    assert study.dataset_pattern(streams=True) == "inet|big"
    assert study.dataset_pattern(streams=False) == "digits|pets"
    assert Study(TINY).dataset_pattern(streams=True) == "(?!)"  # matches nothing


def test_the_schemas_defaults_fill_what_a_config_leaves_out():
    study = Study(dict(TINY, datasets={"digits": {}, "cifar10": {}}))
    assert study.data_dir == "resources/data"
    assert study.config["datasets"]["digits"] == {"kind": "digits", "val_size": 180, "split_seed": 0}
    assert study.config["datasets"]["cifar10"]["val_size"] == 5000  # the kind's default (sources.py)
    assert study.resources == dict(threads=1, gpus=0, runs_per_gpu=1, mem_mb=4000, runtime=60, device="cpu")
    assert Study(dict(TINY, resources={"gpus": 2})).resources["device"] == "cuda"


def test_settings_resolve_defaults_then_training_then_arch_then_variant():
    config = copy.deepcopy(TINY)
    config["archs"]["net"]["training"] = {"epochs": 7, "momentum": 0.5}
    config["variants"]["manhattan"] = {"optimizer": "batch_manhattan", "lr": 1e-4, "scale": "init"}
    s = Study(config).settings("digits", "net", "manhattan")
    assert s["weight_decay"] == settings.defaults()["weight_decay"]  # set nowhere: the declared default
    assert (s["batch_size"], s["alignment_every"]) == (32, 2)  # the study's training block
    assert (s["epochs"], s["momentum"]) == (7, 0.5)  # the arch's
    assert (s["optimizer"], s["lr"], s["scale"]) == ("batch_manhattan", 1e-4, "init")  # the variant's


def test_an_archs_training_block_changes_only_what_it_names():
    # cifar10's Arch 1 sets its own epochs and lr; the study's alignment_every (390) still holds.
    # (Filling the arch's block with the schema's defaults had reset it to 0.)
    s = Study(shipped("cifar10.yaml")).settings("cifar10", "arch1", "raw")
    assert (s["epochs"], s["lr"], s["alignment_every"], s["batch_size"]) == (100, 0.01, 390, 128)


def test_the_train_flags_give_the_cli_the_resolved_settings():
    study = Study(shipped("cifar10.yaml"))
    flags = study.train_flags("cifar10", "arch1", "manhattan")
    args = build_parser().parse_args(["--dataset", "cifar10", "--data", "d.pt", "--out", "o", "--rule", "fa",
                                      *shlex.split(flags)])
    resolved = study.settings("cifar10", "arch1", "manhattan")
    for name in settings.defaults():
        assert getattr(args, name) == resolved[name], name
    assert (args.arch, args.arch_label, args.variant, args.scale) == ("arch1", "arch1", "manhattan", "init")
    assert (args.crop, args.pad, args.flip, args.batch_norm) == (24, 0, True, False)


def test_a_variants_rule_options_reach_only_its_runs_flags():
    config = copy.deepcopy(TINY)
    config["variants"]["mirrored"] = {"rule_options": {"lr": 0.2, "every": 2}}
    config["grid"] = [{"datasets": ["digits"], "archs": ["net"], "rules": ["wm"], "variants": ["mirrored", "raw"]}]
    study = Study(config)
    assert study.train_flags("digits", "net", "mirrored").endswith("--rule-option lr=0.2 --rule-option every=2")
    assert "--rule-option" not in study.train_flags("digits", "net", "raw")


def test_the_launcher_splits_a_jobs_threads_among_its_gpus():
    one = Study(dict(TINY, resources={"threads": 4, "gpus": 1, "runs_per_gpu": 2}))
    assert one.launcher() == "python -m feedback_alignment train --threads 4 --runs-per-gpu 2"
    eight = Study(dict(TINY, resources={"threads": 64, "gpus": 8, "workers": 8}))
    assert eight.launcher() == ("torchrun --standalone --nproc-per-node 8 -m feedback_alignment train "
                                "--threads 8 --workers 8")


def test_prepare_flags_give_the_cli_each_datasets_kind_and_options(tmp_path):
    folder = tmp_path / "my images"  # a space: the flags must quote it
    folder.mkdir()
    datasets = {"digits": {},
                "cifar10": {"url": "http://127.0.0.1:1/c.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a"},
                "fmnist": {"kind": "fashion_mnist", "mirror": "http://127.0.0.1:1/f/", "image_size": 32,
                           "md5": {"train-images-idx3-ubyte.gz": "0" * 32, "t10k-images-idx3-ubyte.gz": "1" * 32}},
                "pets": {"kind": "imagefolder", "path": str(folder), "val_size": 7},
                "big": {"kind": "imagefolder", "path": str(folder), "stream": True},
                "imagenet": {"path": str(tmp_path)}}
    study = Study(dict(TINY, datasets=datasets))
    assert study.prepare_flags("digits") == "--name digits --kind digits --val-size 180 --split-seed 0"
    parser = prepare_parser()
    for name, given in datasets.items():
        args = parser.parse_args(["--out", "x", *shlex.split(study.prepare_flags(name))])
        assert (args.name, args.kind) == (name, given.get("kind", name))
        options = {key: value for key, value in vars(args).items() if key not in ("name", "kind", "out") and value}
        expected = {key: str(value) for key, value in study.config["datasets"][name].items()
                    if key != "kind" and value is not None and not isinstance(value, dict)}
        if isinstance(given.get("md5"), dict):
            expected["md5"] = [f"{file}={digest}" for file, digest in given["md5"].items()]
        elif "md5" in given:
            expected["md5"] = [given["md5"]]
        assert options == expected, name


def tuned(**sweep) -> dict:
    config = copy.deepcopy(TINY)
    config["grid"].append({"datasets": ["digits"], "archs": ["net"], "rules": ["wm"], "variants": ["raw"]})
    config["tuning"] = {"sweep": sweep}
    return config


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["tuning"]["sweep"].update(learning_rate=[0.1]), "tuning.sweep.learning_rate"),
    (lambda c: c["tuning"]["sweep"].update({"rule_options.gain": [1]}), "tuning.sweep.rule_options.gain"),
    (lambda c: c["tuning"]["sweep"].update(momentum=[]), "tuning.sweep.momentum"),
    (lambda c: c["tuning"]["sweep"].update(lr=[0.1, -1.0]), "tuning.sweep.lr[1]"),
    (lambda c: c["tuning"]["sweep"].update(optimizer=["sgd", "rmsprop"]), "tuning.sweep.optimizer[1]"),
    (lambda c: c["tuning"]["sweep"].update({"rule_options.every": [1, 0]}), "tuning.sweep.rule_options.every[1]"),
    (lambda c: c["variants"]["raw"].update(lr=0.01), "tuning.sweep.lr"),  # the variant fixes lr
    (lambda c: c["variants"].update(mirrored={"rule_options": {"every": 2}}) or c["grid"][2]["variants"].append(
        "mirrored") or c["tuning"]["sweep"].update({"rule_options.every": [1, 2]}), "tuning.sweep.rule_options.every"),
    (lambda c: c["tuning"].update(seeds=[0.5]), "tuning.seeds.0"),
    (lambda c: c["tuning"].update(seeds="0"), "tuning.seeds"),
    (lambda c: c["tuning"].update(seeds=[]), "tuning.seeds"),
    (lambda c: c["tuning"].pop("sweep"), "tuning"),
])
def test_a_tuning_block_that_cannot_run_is_refused_naming_the_key(edit, key):
    config = tuned(lr=[0.02, 0.05])
    edit(config)
    with pytest.raises(ConfigError) as error:
        Study(config)
    assert str(error.value).startswith(f"config key {key}: ") and "\n" not in str(error.value)


def test_tuning_trains_every_point_with_the_tuning_seeds_rule_options_only_where_a_rule_has_them():
    study = Study(dict(tuned(lr=[0.02, 0.1], **{"rule_options.every": [1, 2]}), seeds=[0, 1, 2]))
    assert study.points("bp") == ["lr=0.02", "lr=0.1"]
    assert study.points("wm") == ["lr=0.02,rule_options.every=1", "lr=0.02,rule_options.every=2",
                                  "lr=0.1,rule_options.every=1", "lr=0.1,rule_options.every=2"]
    assert len(study.tuning_runs) == 2 + 2 + 2 + 4  # bp, usf raw, usf matched, wm; one tuning seed (default 0)
    run = Run("digits", "net", "wm", "raw", 0, "lr=0.1,rule_options.every=2")
    assert run in study.tuning_runs
    assert study.run_dir(run) == "results/tiny/tuning/digits/net/wm-raw/lr=0.1,rule_options.every=2/seed0"
    flags = study.train_flags("digits", "net", "raw", run.point)
    assert "--lr 0.1 " in flags and flags.endswith("--rule-option every=2")
    s = study.settings("digits", "net", "raw", run.point)
    assert s["lr"] == 0.1 and s["rule_options"] == {"every": 2}
    assert study.settings("digits", "net", "raw")["rule_options"] == {}  # the point changed a copy
    assert study.selection_file("digits", "net", "wm", "raw") == "results/tiny/tuning/digits/net/wm-raw/selected.json"
    assert len(study.selection_files()) == 4 and len(study.runs) == 12  # the study's own runs as before


def test_a_study_without_tuning_has_no_tuning_runs():
    study = Study(TINY)
    assert study.tuning_runs == [] and study.selection_files() == [] and study.points("bp") == [""]


@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar100.yaml", "mnist.yaml", "depth.yaml", "imagenet.yaml"])
def test_no_setting_of_a_shipped_study_comes_from_the_default_studys_config(name):
    # Snakemake merges a --configfile into config/config.yaml key by key: whatever the default
    # study sets and this one does not, this one would inherit (ImageNet probed alignment every
    # 20 steps that way).
    default, study = shipped("config.yaml"), shipped(name)
    assert set(default["training"]) - set(study["training"]) == set()
    assert {key for key in default if key not in ("datasets", "archs", "variants")} <= set(study)


def test_lenet_has_biotorchs_layers_and_a_study_feeding_it_28px_mnist_is_refused():
    from feedback_alignment.models import build_model

    # Parameters counted by hand from BioTorch's layer sizes (conv 5x5 weights + biases, FC).
    mnist = (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (16 * 120 * 25 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    cifar = (3 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (64 * 128 * 25 + 128) + (128 * 84 + 84) + (84 * 10 + 10)
    for arch, channels, expected in (("lenet_mnist", 1, mnist), ("lenet_cifar", 3, cifar)):
        model = build_model(arch, 10, channels, 32, batch_norm=False)
        assert sum(p.numel() for p in model.parameters()) == expected
    config = copy.deepcopy(TINY)
    config["datasets"] = {"mnist": {}}
    config["archs"] = {"lenet": {"arch": "lenet_mnist", "batch_norm": False}}
    config["grid"] = [{"datasets": ["mnist"], "archs": ["lenet"], "rules": ["bp"], "variants": ["exact"]}]
    with pytest.raises(ConfigError, match="archs.lenet with variants.exact on mnist: lenet needs images of side 32"):
        Study(config)
    config["datasets"]["mnist"]["image_size"] = 32
    Study(config)


@pytest.mark.parametrize("arch", ["convnet", "arch1", "lenet_cifar", "resnet20", "resnet18"])
def test_the_config_check_builds_each_model_with_its_modules_and_shapes(arch):
    import torch
    from feedback_alignment.models import ShapesOnly, build_model

    with ShapesOnly():
        checked = build_model(arch, 10, 3, 32, True, 3, 8)
    plain = build_model(arch, 10, 3, 32, True, 3, 8)
    assert [(name, p.shape) for name, p in checked.named_parameters()] == [
        (name, p.shape) for name, p in plain.named_parameters()]
    assert {p.device.type for p in checked.parameters()} == {"meta"}
    assert torch.empty(2).normal_().device.type == "cpu"  # the mode ends with its block


def test_checking_a_studys_models_leaves_torchs_compiler_and_pandas_unimported():
    """On meta tensors torch.nn.init's normal_ imports torch._dynamo (seconds, at every Snakemake
    start): the config check skips the random fills. Nor does the check need pandas (0.4 s), which
    alignment and tuning import where they use it. In a fresh process: this one has imported both."""
    import subprocess
    import sys

    code = ("import sys, yaml; from feedback_alignment.study import Study; "
            "Study(yaml.safe_load(open(sys.argv[1]))); print('torch._dynamo' in sys.modules, 'pandas' in sys.modules)")
    process = subprocess.run([sys.executable, "-c", code, str(REPO / "config" / "cifar10.yaml")],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip() == "False False"
