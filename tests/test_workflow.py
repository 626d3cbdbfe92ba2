"""The Snakemake workflow, run for real (tiny configs, temporary directories)."""
import json
import os
import re
import shutil

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, TINY, cli, place_prepared_data, snakemake, snakemake_here
from feedback_alignment import data
from feedback_alignment.evaluate import evaluate_run
from test_sources import image_folder, serve_mnist

def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake plan, as {rule: count}."""
    table = output[output.index("Job stats:"):].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def write_config(workdir, config, name="config.yaml"):
    path = workdir / "config" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


# The tiny study, tuned as the default study is: each block trains at two learning rates on seed
# 0, then its seeds at the lower validation error, seed 0 taken from the tuning run at that point.
TUNED = dict(TINY, grid=[{"datasets": ["digits"], "archs": ["net"], "rules": ["bp"], "variants": ["exact"]},
                         {"datasets": ["digits"], "archs": ["net"], "rules": ["usf"], "variants": ["matched"]}],
             tuning={"seeds": [0], "sweep": {"lr": [0.02, 0.2]}})


@pytest.mark.slow(seconds=75)
def test_a_tuned_study_end_to_end(tmp_path):
    write_config(tmp_path, TUNED)
    results = tmp_path / "results" / "tiny"
    # A tuning stage stopped after one run continues where it stopped.
    first = results / "tuning/digits/net/bp-exact/lr=0.02/seed0/result.json"
    snakemake(tmp_path, "--cores", "2", str(first.relative_to(tmp_path)))
    stamp = first.stat().st_mtime_ns
    rest = snakemake(tmp_path, "--cores", "2")
    assert rest.stdout.count("rule train_tuning:") + rest.stderr.count("rule train_tuning:") == 3
    assert first.stat().st_mtime_ns == stamp

    # Selection: the point of lowest validation error, its seed-0 run reused, seed 1 trained there.
    tuning = pd.read_csv(results / "tuning.csv")
    assert list(tuning.columns) == ["dataset", "arch", "rule", "variant", "lr", "n_seeds", "val_error_mean",
                                    "val_error_std", "selected"]
    summary = pd.read_csv(results / "summary.csv")
    assert set(zip(summary.rule, summary.variant)) == {("bp", "exact"), ("usf", "matched")}
    for rule, variant in (("bp", "exact"), ("usf", "matched")):
        rows = tuning[tuning.rule == rule]
        chosen = rows.loc[rows.val_error_mean.idxmin()]
        assert chosen.selected and rows.selected.sum() == 1
        assert summary.set_index("rule").loc[rule, "selected"] == f"lr={chosen.lr}"
        group = results / "runs/digits/net" / f"{rule}-{variant}"
        reused, trained = (json.loads((group / f"seed{s}" / "result.json").read_text()) for s in (0, 1))
        tuning_run = results / f"tuning/digits/net/{rule}-{variant}/lr={chosen.lr}/seed0"
        assert reused["reused_from"] == str(tuning_run.relative_to(tmp_path))
        assert not (group / "seed0" / "checkpoint.pt").exists() and (group / "seed1" / "checkpoint.pt").exists()
        assert reused["best_val_error"] == json.loads((tuning_run / "result.json").read_text())["best_val_error"]
        assert (group / "seed0" / "best.pt").read_bytes() == (tuning_run / "best.pt").read_bytes()
        assert trained["config"]["lr"] == chosen.lr and "reused_from" not in trained
    comparisons = pd.read_csv(results / "comparisons.csv")
    assert list(comparisons.rule) == ["usf"] and comparisons.n_pairs.iloc[0] == 2

    # A trained run: its history, result and provenance.
    assert (summary.n_seeds == 2).all()
    assert summary.test_error_mean.between(0, 100).all() and summary.test_error_std.notna().all()
    run = results / "runs" / "digits" / "net" / "usf-matched" / "seed1"
    history = pd.read_csv(run / "history.csv")
    assert list(history.epoch) == [1, 2]
    assert {"train_loss", "train_error", "val_error", "test_error", "lr", "seconds", "images_per_s"} <= set(history)
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["config"]["scale"] == "match"
    assert result["config"]["rule"] == "usf" and result["config"]["seed"] == 1
    assert {"git_sha", "torch", "device"} <= set(result["provenance"])
    if shutil.which(os.environ.get("CC", "cc")):  # usf ran on a CPU: through the fused kernel
        assert result["provenance"]["fused_cpu_kernel"].endswith(".so")
    evaluation = json.loads((run / "evaluation.json").read_text())
    # The summary's mean is the mean of the seeds' evaluations.
    errors = [json.loads((results / "runs/digits/net/usf-matched" / f"seed{s}" / "evaluation.json").read_text())
              ["test_error_top1"] for s in (0, 1)]
    row = summary[(summary.rule == "usf") & (summary.variant == "matched")].iloc[0]
    assert row.test_error_mean == pytest.approx(sum(errors) / 2)
    assert evaluation["test_error_top1"] in errors
    # The training job wrote evaluation.json from the best epoch's test pass: the error its history
    # recorded there, and what loading best.pt into a fresh model and measuring again gives.
    assert evaluation["test_error_top1"] == pytest.approx(history.set_index("epoch").test_error[result["best_epoch"]],
                                                          abs=1e-9)
    again = evaluate_run(run, "cpu", threads=1, data=str(tmp_path / "resources" / "data" / "digits.pt"))
    assert again["test_error_top1"] == pytest.approx(evaluation["test_error_top1"], abs=1e-9)
    assert again["test_loss"] == pytest.approx(evaluation["test_loss"], rel=1e-6)
    assert {key: value for key, value in again.items() if key != "provenance"} == {
        key: pytest.approx(value) if key == "test_loss" else value
        for key, value in evaluation.items() if key != "provenance"}
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert any(key.endswith("feedback_direction") for key in checkpoint["model"])

    # The figures, and the numbers they plot (the CSV beside each holds what it drew).
    for name in ("test_error_curves.png", "final_error.png", "update_angles.png", "feedback_alignment.png",
                 "gradient_norms.png", "error_vs_depth.png", "sensitivity.png"):
        assert (results / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars = pd.read_csv(results / "figures" / "final_error.csv")
    assert bars[bars.series == "usf (matched)"].y.tolist() == pytest.approx([row.test_error_mean])
    assert sorted(bars[bars.series == "usf (matched) seeds"].y) == pytest.approx(sorted(errors))
    curves = pd.read_csv(results / "figures" / "test_error_curves.csv")
    drawn = curves[curves.panel.str.endswith("variant: matched") & (curves.series == "usf")]
    histories = pd.concat(pd.read_csv(results / "runs/digits/net/usf-matched" / f"seed{s}" / "history.csv")
                          for s in (0, 1))
    assert drawn.y.tolist() == pytest.approx(histories.groupby("epoch").test_error.mean().tolist())
    assert drawn.x.tolist() == [1, 2]
    alignment = pd.read_csv(results / "alignment.csv")
    # Measured before the first step and every 2 steps: steps 0, 2, 4, 6 of 6; 3 layers each.
    per_run = alignment[(alignment.rule == "usf") & (alignment.variant == "matched") & (alignment.seed == 1)]
    assert sorted(per_run.step.unique()) == [0, 2, 4, 6] and per_run.layer.nunique() == 3
    assert (alignment[alignment.rule == "bp"].angle_update.abs() < 1e-3).all()
    assert set(pd.read_csv(results / "vs_reference.csv").columns) >= {"ours", "reference_error", "source"}
    snakemake_here(tmp_path, "--report", "report.html")
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert not list(tmp_path.rglob("*.tmp"))
    # Figures regenerate from results without training again: the plan for a lost figure has the
    # figures job (the job that drew them above) and no training (the summary is in it too, as
    # evaluate_run above wrote an evaluation.json again).
    (results / "figures" / "final_error.png").unlink()
    plan = job_counts(snakemake_here(tmp_path, "-n", "--cores", "1", "figures").stdout)
    assert plan["figures"] == 1 and "train" not in plan and "train_tuning" not in plan, plan


@pytest.mark.slow(seconds=30)
def test_an_image_folder_study_runs_end_to_end(tmp_path):
    # A researcher's own folder under a free name, resized for LeNet, two rules (one of them in two
    # variants), through Snakemake.
    root = image_folder(tmp_path / "my pets", per_class=(24, 6))  # a space in the path: quoted
    config = dict(TINY, experiment="pets", seeds=[0],
                  datasets={"pets": {"kind": "imagefolder", "path": str(root), "image_size": 32}},
                  archs={"lenet": {"arch": "lenet_mnist", "batch_norm": False}},
                  grid=[{"datasets": ["pets"], "archs": ["lenet"], "rules": ["bp"], "variants": ["raw"]},
                        {"datasets": ["pets"], "archs": ["lenet"], "rules": ["usf"], "variants": ["raw", "matched"]}])
    write_config(tmp_path, config)
    snakemake(tmp_path, "--cores", "2", "results/pets/summary.csv")  # (figures: test_a_tuned_study_end_to_end)
    cache = torch.load(tmp_path / "resources" / "data" / "pets.pt", weights_only=True)
    assert cache["kind"] == "imagefolder" and cache["train_images"].shape == (44, 1, 32, 32)
    summary = pd.read_csv(tmp_path / "results" / "pets" / "summary.csv")
    lenet = ("pets", "imagefolder", "lenet", "lenet_mnist")
    assert sorted(zip(summary.dataset, summary.kind, summary.arch, summary.model, summary.rule, summary.variant)) == [
        (*lenet, "bp", "raw"), (*lenet, "usf", "matched"), (*lenet, "usf", "raw")]
    scales = {variant: json.loads((tmp_path / f"results/pets/runs/pets/lenet/usf-{variant}/seed0/result.json")
                                  .read_text())["config"]["scale"] for variant in ("raw", "matched")}
    assert scales == {"raw": "none", "matched": "match"}
    evaluation = json.loads((tmp_path / "results/pets/runs/pets/lenet/usf-raw/seed0/evaluation.json").read_text())
    assert evaluation["dataset_kind"] == "imagefolder" and evaluation["num_classes"] == 2
    assert evaluation["status"] == "completed" and 0 <= evaluation["test_error_top1"] <= 100


@pytest.mark.slow(seconds=10)
def test_the_prepare_step_fetches_a_torchvision_kind_from_a_mirror_with_its_checksums(tmp_path, loopback_server):
    # The config's mirror and {file: md5} reach the prepare CLI through Snakemake's shell intact.
    served, base = loopback_server
    md5 = serve_mnist(served)
    config = dict(TINY, datasets={"digits": {}, "fmnist": {"kind": "fashion_mnist", "mirror": f"{base}/", "md5": md5,
                                                           "val_size": 8, "image_size": 32}})
    write_config(tmp_path, config)
    snakemake_here(tmp_path, "--cores", "1", "resources/data/fmnist.pt")
    cache = torch.load(tmp_path / "resources" / "data" / "fmnist.pt", weights_only=True)
    assert (cache["name"], cache["kind"], cache["num_classes"]) == ("fmnist", "fashion_mnist", 10)
    assert cache["train_images"].shape[1:] == (1, 32, 32) and len(cache["val_labels"]) == 8
    log = (tmp_path / "logs" / "prepare" / "fmnist.log").read_text()
    assert "Traceback" not in log


@pytest.mark.slow(seconds=11)
def test_the_shipped_mnist_and_cifar100_studies_plan(tmp_path):
    for name, prepares in (("mnist.yaml", ["--name mnist --kind mnist", "--name fashion_mnist --kind fashion_mnist"]),
                           ("cifar100.yaml", ["--name cifar100 --kind cifar100"])):
        out = snakemake_here(tmp_path, "-n", "-p", "--configfile", str(REPO / "config" / name)).stdout
        assert all(f"feedback_alignment prepare --out resources/data/{p.split()[1]}.pt {p}" in out for p in prepares), name
        assert "--image-size 32" in out or name == "cifar100.yaml"


@pytest.mark.slow
def test_a_config_that_cannot_run_stops_snakemake_with_one_line_naming_the_key(tmp_path):
    # Every check is tested in-process (tests/test_study.py); this is the path through Snakemake.
    config = json.loads(json.dumps(TINY))
    config["grid"][1]["rules"].append("xyz")
    write_config(tmp_path, config)
    process = snakemake_here(tmp_path, "-n", check=False)
    assert process.returncode != 0
    assert "config key grid[1].rules: unknown rule 'xyz'; choose from bp, " in process.stdout + process.stderr
    assert "Traceback" not in process.stdout + process.stderr


@pytest.mark.slow
def test_the_workflow_passes_snakemakes_lint(tmp_path):
    write_config(tmp_path, TINY)
    process = snakemake_here(tmp_path, "--lint", check=False)
    assert process.returncode == 0 and "Lints for" not in process.stdout + process.stderr, process.stdout[-3000:]


@pytest.mark.slow
def test_imagenet_config_plans_given_a_folder(tmp_path):
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "n01440764").mkdir(parents=True)
    config = yaml.safe_load((REPO / "config" / "imagenet.yaml").read_text())
    config["datasets"]["imagenet"]["path"] = str(imagenet)
    path = write_config(tmp_path, config, "imagenet.yaml")
    process = snakemake_here(tmp_path, "-n", "-p", "--configfile", str(path))
    counts = job_counts(process.stdout)
    assert counts["train"] == 69 and "prepare_streamed" in process.stdout
    assert "train_tuning" not in counts  # its tuning: null drops the default study's tuning block
    # Eight GPUs per run: one data-parallel process per GPU, the job's 64 threads split among them,
    # each with the config's DataLoader workers.
    assert ("torchrun --standalone --nproc-per-node 8 -m feedback_alignment train --threads 8 --workers 8 "
            in process.stdout)
    assert f"--path {imagenet} --val-size 10000" in process.stdout  # the held-out selection split
    assert "gpu=8" in process.stdout


@pytest.mark.slow(seconds=18)
def test_a_run_with_two_gpus_goes_through_torchrun(tmp_path, tmp_path_factory):
    # On this CPU machine the two processes use gloo: the same launch path as on a GPU node.
    config = dict(TINY, resources={"gpus": 2, "threads": 2, "device": "cpu"},
                  grid=[{"datasets": ["digits"], "archs": ["net"], "rules": ["brsf"], "variants": ["matched"]}],
                  seeds=[0])
    write_config(tmp_path, config)
    place_prepared_data(tmp_path_factory, tmp_path, config)
    snakemake_here(tmp_path, "--cores", "2", "results/tiny/runs/digits/net/brsf-matched/seed0/evaluation.json")
    run = tmp_path / "results/tiny/runs/digits/net/brsf-matched/seed0"
    result = json.loads((run / "result.json").read_text())
    assert result["placement"]["world_size"] == 2 and result["status"] == "completed"


@pytest.mark.slow
def test_slurm_profile_plans_the_grid(tmp_path):
    # A plan only (tests/test_slurm.py submits to a real SLURM).
    process = snakemake_here(tmp_path, "-n", "--workflow-profile", str(REPO / "profiles" / "slurm"),
                        "--configfile", str(REPO / "config" / "cifar10.yaml"))
    out = process.stdout
    counts = job_counts(out)
    assert counts["train"] == 255 and counts["train_tuning"] == 85 * 4 and "evaluate" not in counts
    assert "gpu=1" in out and "slurm_partition=gpu" in out
    assert "gpu_model" not in out.replace("gpu_model=,", "")  # none set: any GPU
    assert "slurm_extra=--signal=USR1@300" in out  # the warning before the time limit
    assert "nodes=1" in out


@pytest.mark.slow
def test_gpu_jobs_train_on_cuda(tmp_path):
    config = yaml.safe_load((REPO / "config" / "cifar10.yaml").read_text())
    config["resources"]["gpu_model"] = "h100"
    # Its first block of the grid, one seed, tuned: what a job is given does not depend on the grid's
    # size (test_slurm_profile_plans_the_grid plans the whole study), and Snakemake takes seconds
    # to plan its 595 jobs.
    config.update(grid=config["grid"][:1], seeds=[0])
    path = write_config(tmp_path, config, "gpus.yaml")
    out = snakemake_here(tmp_path, "-n", "-p", "--configfile", str(path)).stdout
    trains = [line for line in out.splitlines() if "feedback_alignment train " in line]
    assert trains and all("--device cuda " in line for line in trains)
    assert "feedback_alignment evaluate " not in out  # the training job measures its best weights
    assert "gpu_model=h100" in out
    # A study without GPUs asks for none, of no model.
    config["resources"].update(gpus=0)
    path = write_config(tmp_path, config, "cpu.yaml")
    out = snakemake_here(tmp_path, "-n", "-p", "--configfile", str(path)).stdout
    assert "--device cpu " in out and "--device cuda" not in out
    assert "gpu_model=h100" not in out


def test_a_run_given_a_gpu_stops_where_cuda_is_not_usable(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    data.prepare_digits(tmp_path / "digits.pt")
    status, stderr = cli("train", "--dataset", "digits", "--data", str(tmp_path / "digits.pt"),
                         "--out", str(tmp_path / "run"), "--arch", "convnet", "--rule", "fa", "--device", "cuda",
                         "--epochs", "1")
    assert status == 1
    assert stderr.strip().splitlines() == [
        "train: --device cuda: CUDA is not usable in this process (torch.cuda.is_available() is False: no GPU "
        "visible to it, or a CPU-only torch build); a job given GPUs stops rather than train on the CPU"]
    assert not (tmp_path / "run").exists()
