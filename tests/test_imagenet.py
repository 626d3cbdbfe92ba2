"""The ImageNet path (DataLoader workers, ImageFolder) on a tiny folder made here, one and two processes."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
FLAGS = ["--dataset", "imagenet", "--arch", "convnet", "--depth", "2", "--width", "8", "--no-batch-norm",
         "--rule", "frsf", "--scale", "match", "--epochs", "2", "--batch-size", "8", "--crop", "16",
         "--lr", "0.05", "--device", "cpu", "--threads", "1", "--workers", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    generator = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 5)):
        for label in ("n01440764", "n01443537"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = generator.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    path = root / "imagenet.json"
    subprocess.run([sys.executable, "-m", "feedback_alignment", "prepare", "--dataset", "imagenet",
                    "--path", str(root), "--out", str(path)], check=True, timeout=120)
    return path


def train(launcher, manifest, out):
    process = subprocess.run([*launcher, "-m", "feedback_alignment", "train", "--data", str(manifest),
                              "--out", str(out), *FLAGS], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_imagenet_trains_in_one_and_in_two_processes(manifest, tmp_path):
    single = train([sys.executable], manifest, tmp_path / "single")
    parallel = train(TORCHRUN, manifest, tmp_path / "parallel")
    assert single["status"] == parallel["status"] == "completed"
    assert parallel["placement"]["world_size"] == 2 and single["num_classes"] == 2
    a, b = (pd.read_csv(tmp_path / name / "history.csv") for name in ("single", "parallel"))
    # 24 training images, batches of 8: 3 global batches an epoch, each image once, not per rank.
    assert list(a["images"]) == list(b["images"]) == [24, 24]
    # Every validation error is a multiple of 1/10: the ranks' shares add up to the 10 images.
    for errors in (a["val_error"], b["val_error"]):
        assert all(abs(e / 10 - round(e / 10)) < 1e-9 for e in errors), list(errors)
