"""The ImageNet path (prepare, DataLoader workers, ImageFolder) on tiny data made here: class
folders, and the official tarballs in their real format, unpacked by torchvision's own code."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
import scipy.io
from PIL import Image

from conftest import cli_ok, computed_once
from feedback_alignment import data, folders

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
FLAGS = ["--dataset", "imagenet", "--arch", "convnet", "--depth", "2", "--width", "8", "--no-batch-norm",
         "--rule", "frsf", "--scale", "match", "--epochs", "2", "--batch-size", "8", "--crop", "16",
         "--lr", "0.05", "--device", "cpu", "--threads", "1", "--workers", "1", "--seed", "0"]
WNIDS = ("n01440764", "n01443537")


def image_bytes(generator, format="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(generator.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format=format)
    return buffer.getvalue()


def class_folders(root, train=12, val=5):
    generator = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in WNIDS:
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                (folder / f"{index}.png").write_bytes(image_bytes(generator))
    return root


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    def prepare(folder):
        class_folders(folder)
        cli_ok("prepare", "--name", "imagenet", "--path", str(folder), "--val-size", "4",
               "--out", str(folder / "imagenet.json"))
    return computed_once(tmp_path_factory, "imagenet", prepare) / "imagenet.json"


def train(launcher, manifest, out):
    process = subprocess.run([*launcher, "-m", "feedback_alignment", "train", "--data", str(manifest),
                              "--out", str(out), *FLAGS], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow(seconds=15)
def test_imagenet_trains_in_one_and_in_two_processes(manifest, tmp_path):
    # One process: this one, reading in the main process (no DataLoader worker; the workers'
    # number is placement, not part of the run). Two: torchrun's, each rank with a worker.
    cli_ok("train", "--data", str(manifest), "--out", str(tmp_path / "single"), *FLAGS, "--workers", "0")
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    parallel = train(TORCHRUN, manifest, tmp_path / "parallel")
    assert single["status"] == parallel["status"] == "completed"
    assert parallel["placement"]["world_size"] == 2 and single["num_classes"] == 2
    a, b = (pd.read_csv(tmp_path / name / "history.csv") for name in ("single", "parallel"))
    # 24 training images less 4 held out, batches of 8: 2 global batches an epoch, each image
    # once, not per rank.
    assert list(a["images"]) == list(b["images"]) == [16, 16]
    # Validation is the 4 held-out training images, test the 10 official validation images: every
    # error is a multiple of 1/4 and 1/10, the ranks' shares adding up to the whole split.
    for history in (a, b):
        assert all(abs(e / 25 - round(e / 25)) < 1e-9 for e in history["val_error"]), list(history["val_error"])
        assert all(abs(e / 10 - round(e / 10)) < 1e-9 for e in history["test_error"]), list(history["test_error"])
    # The same run: the same images in each global batch, with the same crops and flips (seeded
    # per image, not per worker), so the same losses and weights up to float summation order.
    for column in ("train_loss", "train_error", "val_error", "test_error"):
        pd.testing.assert_series_equal(b[column], a[column], rtol=1e-4, atol=1e-3)
    wa, wb = (torch.load(tmp_path / name / "best.pt", weights_only=True)["model"] for name in ("single", "parallel"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_augmentation_is_drawn_per_run_seed_epoch_and_image(manifest):
    """The same (epoch, image) gives the same crop whatever the random state around it, which it
    leaves alone; another epoch, image or run seed gives another crop."""
    from feedback_alignment.imagenet import StreamedLoaders, _Augmented

    config = dict(data=str(manifest), crop=16, workers=0, threads=1, batch_size=4, max_batches=None, seed=0)
    augmented = _Augmented(StreamedLoaders(config, torch.device("cpu")).train_set, seed=0)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first, label = augmented[(0, 3)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    torch.manual_seed(2)
    again, _ = augmented[(0, 3)]
    assert torch.equal(first, again)
    # The same file's other crops: epochs 1-3, and run seed 1 (20 training images; 5 draws each
    # to rule out a chance repeat of the same crop).
    assert all(not torch.equal(first, augmented[(epoch, 3)][0]) for epoch in (1, 2, 3))
    assert not torch.equal(first, _Augmented(augmented.images, seed=1)[(0, 3)][0])
    # Different images do not share one draw: crops' positions differ (compared as the crop
    # parameters the same seeds give to torchvision's sampler).
    from torchvision import transforms
    boxes = set()
    for position in range(6):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmented.seed_of(0, position))
            boxes.add(transforms.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), (0.08, 1.0), (3 / 4, 4 / 3)))
    assert len(boxes) == 6


@pytest.mark.slow
def test_selection_holds_out_training_images_and_one_loader_serves_every_epoch(manifest):
    from feedback_alignment.imagenet import StreamedLoaders
    import torch

    config = dict(data=str(manifest), crop=16, workers=1, threads=1, batch_size=4, max_batches=None, seed=0)
    loaders = StreamedLoaders(config, torch.device("cpu"))
    held_out = set(loaders.eval_sets["val"].indices)
    trained = set(loaders.train_set.indices)
    assert len(held_out) == 4 and len(trained) == 20 and not held_out & trained
    assert loaders.eval_sets["val"].dataset.samples is loaders.train_set.dataset.samples  # no second scan
    assert len(loaders.eval_sets["test"]) == 10
    seen, used = [], []
    for epoch in range(2):
        seen.append(sum(len(labels) for _, labels in loaders.train(epoch)))
        used.append(loaders._train_loader)
    assert seen == [20, 20] and used[0] is used[1] and used[0].persistent_workers
    assert used[0].prefetch_factor == 4 and not used[0].pin_memory  # pinned only for a GPU


def test_imagenet_path_checks(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        folders.prepare_imagenet(tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="neither train/ and val/"):
        folders.prepare_imagenet(tmp_path)
    root = class_folders(tmp_path / "folders", train=3, val=1)
    with pytest.raises(data.DataError, match="val_size 6 must be between 0 and the 6 training images"):
        folders.prepare_imagenet(root, val_size=6)
    (root / "val" / "n99999999").mkdir()
    with pytest.raises(data.DataError, match="train/ and val/ hold different class folders"):
        folders.prepare_imagenet(root, val_size=2)


def official_tarballs(root):
    """ILSVRC2012's three files in their real layout: a devkit with meta.mat and the validation
    ground truth, a train tar of per-class tars, a flat val tar. Returns their md5s."""
    generator = np.random.default_rng(1)
    root.mkdir(parents=True)

    def add(archive, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))

    synsets = np.array([(1, WNIDS[0], "tench, Tinca tinca", "a fish", 0), (2, WNIDS[1], "goldfish", "a fish", 0)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                              ("num_children", "O")])
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    val_labels = [1, 2, 2, 1, 2]
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        add(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            "".join(f"{label}\n" for label in val_labels).encode())
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for wnid in WNIDS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for index in range(6):
                    add(class_tar, f"{wnid}_{index}.JPEG", image_bytes(generator, "JPEG"))
            add(train_tar, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for index in range(len(val_labels)):
            add(val_tar, f"ILSVRC2012_val_{index + 1:08d}.JPEG", image_bytes(generator, "JPEG"))
    return {name: hashlib.md5((root / name).read_bytes()).hexdigest() for name in folders.IMAGENET_TARBALLS}


def test_the_official_tarballs_are_unpacked_once_by_prepare(tmp_path, monkeypatch):
    import torchvision.datasets.imagenet as torchvision_imagenet

    root = tmp_path / "ilsvrc"
    checksums = official_tarballs(root)
    # torchvision checks each archive against ILSVRC2012's published md5; these are the test's own.
    archives = {key: (name, checksums[name]) for key, (name, _) in torchvision_imagenet.ARCHIVE_META.items()}
    monkeypatch.setattr(torchvision_imagenet, "ARCHIVE_META", archives)
    manifest = folders.prepare_imagenet(root, val_size=2)
    assert manifest["num_classes"] == 2 and manifest["train_images"] == 12 and manifest["layout"] == "imagefolder"
    # val images sorted into their classes by the devkit's ground truth (1, 2, 2, 1, 2)
    assert sorted(p.name for p in (root / "val" / WNIDS[0]).iterdir()) == [
        "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000004.JPEG"]
    assert len(list((root / "val" / WNIDS[1]).iterdir())) == 3
    unpacked = {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")}
    assert folders.prepare_imagenet(root, val_size=2) == manifest  # a second prepare unpacks nothing
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")} == unpacked


def test_a_tarball_with_a_wrong_checksum_is_refused_in_one_line(tmp_path):
    root = tmp_path / "ilsvrc"
    official_tarballs(root)  # not ILSVRC2012's md5s
    with pytest.raises(data.DataError, match=r"imagenet path '.*ilsvrc': .*ILSVRC2012_devkit_t12.tar.gz") as error:
        folders.prepare_imagenet(root)
    assert "\n" not in str(error.value)


def test_tarballs_in_a_folder_that_cannot_be_written_are_refused_in_one_line(tmp_path, monkeypatch):
    root = tmp_path / "ilsvrc"
    official_tarballs(root)
    # (the tests run as root, who may write anywhere: the folder's permission is asked of os.access)
    monkeypatch.setattr(folders.os, "access", lambda path, mode: False)
    with pytest.raises(data.DataError, match=r"'.*ilsvrc': the tarballs are unpacked beside them, and this "
                                             r"folder is not writable"):
        folders.prepare_imagenet(root)
    assert not (root / "train").exists() and not (root / "meta.bin").exists()  # nothing unpacked
