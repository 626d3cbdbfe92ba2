"""Datasets: prepared once into a cache, then served as batches kept on the training device.

- digits   : scikit-learn's 8x8 handwritten digits (ships with scikit-learn; no network)
- cifar10  : the official python archive, fetched with torchvision's download code (md5-checked),
             extracted safely, cached as uint8 tensors; 45k/5k train/val split
- imagenet : a user-supplied folder (ImageFolder train/ and val/, or the official tarballs)

Small datasets live on the device as uint8 and are augmented there as tensors (random crop with
padding, horizontal flip), so no DataLoader workers sit in the hot path.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .provenance import torch_save

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_TARBALLS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")
TENSOR_DATASETS = ("digits", "cifar10")
DATASETS = TENSOR_DATASETS + ("imagenet",)


class DataError(ValueError):
    """A dataset is missing, corrupt or malformed; the message says which and where."""


def _split(images: np.ndarray, labels: np.ndarray, holdout: int, seed: int):
    order = np.random.RandomState(seed).permutation(len(labels))
    return (images[order[holdout:]], labels[order[holdout:]]), (images[order[:holdout]], labels[order[:holdout]])


def _cache(path: Path, name: str, splits: dict, num_classes: int, mean, std, source: str) -> None:
    record = dict(name=name, num_classes=num_classes, mean=list(mean), std=list(std), source=source)
    for split, (images, labels) in splits.items():
        record[f"{split}_images"] = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.uint8)
        record[f"{split}_labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    torch_save(path, record)


def prepare_digits(out: Path, val_size: int = 180, test_size: int = 360, split_seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N x 1 x 8 x 8
    labels = digits.target.astype(np.int64)
    if val_size + test_size >= len(labels):
        raise DataError(f"digits has {len(labels)} images; val_size + test_size must leave some to train")
    rest, test = _split(images, labels, test_size, split_seed)
    train, val = _split(*rest, val_size, split_seed + 1)
    mean, std = float(train[0].mean() / 255), float(train[0].std() / 255)
    _cache(out, "digits", dict(train=train, val=val, test=test), 10, (mean,), (std,),
           "sklearn.datasets.load_digits")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract a tar archive, refusing members that would land outside `target` or are links."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = member.name
                resolved = (target / name).resolve()
                if Path(name).is_absolute() or not resolved.is_relative_to(target.resolve()):
                    raise DataError(f"{archive.name}: member {name!r} would extract outside the target directory")
                if member.issym() or member.islnk() or not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive.name}: member {name!r} is a link or special file; refused")
            tar.extractall(target, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive.name}: not a readable tar.gz archive ({error})") from None


def _load_cifar_batch(path: Path):
    if not path.exists():
        raise DataError(f"CIFAR-10 archive lacks {path.parent.name}/{path.name}")
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def prepare_cifar10(out: Path, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                    val_size: int = 5000, split_seed: int = 0) -> None:
    """Download (torchvision's download code), check md5, extract, split, cache. Works in a
    temporary directory beside `out` that is removed whatever happens."""
    from torchvision.datasets.utils import download_url

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=".cifar10-download-"))
    try:
        filename = "cifar-10-python.tar.gz"
        try:
            download_url(url, str(workdir), filename=filename, md5=None)
        except Exception as error:  # urllib/http errors come in many types; name the address
            raise DataError(f"cifar10: download from {url} failed: {error}") from None
        archive = workdir / filename
        if md5 and _md5(archive) != md5:
            raise DataError(f"cifar10: md5 of the file from {url} is {_md5(archive)}, expected {md5} "
                            "(truncated or wrong file; set datasets.cifar10.md5 for a mirror's copy)")
        _safe_extract(archive, workdir / "extracted")
        folder = workdir / "extracted" / "cifar-10-batches-py"
        parts = [_load_cifar_batch(folder / f"data_batch_{index}") for index in range(1, 6)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        test = _load_cifar_batch(folder / "test_batch")
        if not 0 < val_size < len(labels):
            raise DataError(f"cifar10: val_size {val_size} must be between 0 and {len(labels)}")
        train, val = _split(images, labels, val_size, split_seed)
        _cache(out, "cifar10", dict(train=train, val=val, test=test), 10, CIFAR10_MEAN, CIFAR10_STD, url)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def prepare_imagenet(path: str | Path, val_size: int = 10000, split_seed: int = 0) -> dict:
    """Check a user-supplied ImageNet and make it ready to read: class folders train/ and val/, or
    the official tarballs, which torchvision unpacks here, once, into such folders (and its
    meta.bin) beside them. Returns the manifest: where the folders are, the classes, and the
    held-out slice of train that selects models (the official val is the test split)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"imagenet path {str(root)!r} does not exist or is not a directory "
                        "(set datasets.imagenet.path)")
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        if not all((root / name).is_file() for name in IMAGENET_TARBALLS):
            raise DataError(f"imagenet path {str(root)!r} holds neither train/ and val/ folders nor "
                            f"the tarballs {', '.join(IMAGENET_TARBALLS)}")
        _unpack_imagenet(root)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    val_classes = sorted(p.name for p in (root / "val").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"imagenet path {str(root)!r}: train/ holds no class folders")
    if classes != val_classes:
        raise DataError(f"imagenet path {str(root)!r}: train/ and val/ hold different class folders")
    from torchvision.datasets import ImageFolder

    train_images = len(ImageFolder(root / "train").samples)
    if not 0 < val_size < train_images:
        raise DataError(f"imagenet: val_size {val_size} must be between 0 and the {train_images} training images")
    return dict(layout="imagefolder", root=str(root.resolve()), num_classes=len(classes),
                train_images=train_images, val_size=val_size, split_seed=split_seed)


def _unpack_imagenet(root: Path) -> None:
    """torchvision's own unpacking of the official tarballs (checksums, devkit, val labels),
    into root/train and root/val; done in the prepare step so that no training job unpacks."""
    from torchvision.datasets import ImageNet

    if not os.access(root, os.W_OK):
        raise DataError(f"imagenet path {str(root)!r}: the tarballs are unpacked beside them, and this "
                        "folder is not writable")
    try:
        for split in ("train", "val"):
            ImageNet(str(root), split=split)
    except RuntimeError as error:  # a checksum that does not match
        raise DataError(f"imagenet path {str(root)!r}: {error}") from None


# -- serving ------------------------------------------------------------------------------

@dataclass
class TensorData:
    """A cached dataset on one device: uint8 images N x C x H x W, int64 labels, per split."""
    name: str
    splits: dict[str, tuple[Tensor, Tensor]]
    num_classes: int
    mean: Tensor
    std: Tensor

    @property
    def in_channels(self) -> int:
        return self.splits["train"][0].shape[1]

    @property
    def image_size(self) -> int:
        return self.splits["train"][0].shape[-1]


def load_tensor_data(path: str | Path, device: torch.device) -> TensorData:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prepared dataset {str(path)!r} not found; run the download step first")
    record = torch.load(path, map_location="cpu", weights_only=True)
    splits = {split: (record[f"{split}_images"].to(device), record[f"{split}_labels"].to(device))
              for split in ("train", "val", "test")}
    shape = (1, -1, 1, 1)
    return TensorData(record["name"], splits, int(record["num_classes"]),
                      torch.tensor(record["mean"], device=device).view(shape),
                      torch.tensor(record["std"], device=device).view(shape))


def _crop(images: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Per-image crops of size x size at (top, left), by indexing (works on any device)."""
    rows = (top[:, None] + torch.arange(size, device=images.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(size, device=images.device))[:, None, None, :]
    index = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[index, channels, rows, cols]


def augment(images: Tensor, generator: torch.Generator, crop: int, pad: int, flip: bool) -> Tensor:
    if pad:
        images = F.pad(images, (pad, pad, pad, pad))
    room = images.shape[-1] - crop
    if room > 0:
        n = images.shape[0]
        top = torch.randint(0, room + 1, (n,), generator=generator, device=generator.device)
        left = torch.randint(0, room + 1, (n,), generator=generator, device=generator.device)
        images = _crop(images, top.to(images.device), left.to(images.device), crop)
    if flip:
        mask = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
        images = torch.where(mask.to(images.device)[:, None, None, None], images.flip(-1), images)
    return images


def center_crop(images: Tensor, crop: int) -> Tensor:
    offset = (images.shape[-1] - crop) // 2
    return images[..., offset:offset + crop, offset:offset + crop] if offset > 0 else images


def batches(data: TensorData, split: str, batch_size: int, crop: int | None = None,
            max_batches: int | None = None, rank: int = 0, world_size: int = 1):
    """Evaluation batches: in order, center-cropped, normalized. Under data parallelism each
    rank takes every world_size-th batch, so that the ranks together see each image once."""
    images, labels = data.splits[split]
    crop = crop or data.image_size
    count = -(-labels.shape[0] // batch_size)
    for index in range(rank, count if max_batches is None else min(count, max_batches), world_size):
        select = slice(index * batch_size, (index + 1) * batch_size)
        yield _normalize(data, center_crop(images[select], crop)), labels[select]


def _normalize(data: TensorData, images: Tensor) -> Tensor:
    return (images.float().div_(255) - data.mean) / data.std


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation: a resumed epoch replays it."""
    return seed * 100003 + epoch


class EpochBatches:
    """One epoch of shuffled, augmented training batches that can stop and resume exactly: its
    state is the epoch's permutation, the generator state and the index of the next batch.
    Under data parallelism every rank draws the whole global batch (order and augmentation) and
    keeps its `share` of the rows: together the ranks train on exactly the single-process batch."""

    def __init__(self, data: TensorData, batch_size: int, generator: torch.Generator, crop: int,
                 pad: int, flip: bool, max_batches: int | None = None, state: dict | None = None,
                 share: slice = slice(None)):
        self.data, self.batch_size, self.generator, self.share = data, batch_size, generator, share
        self.crop, self.pad, self.flip = crop, pad, flip
        n = data.splits["train"][1].shape[0]
        self.count = n // batch_size  # drop the ragged last batch: every step sees a full batch
        if max_batches is not None:
            self.count = min(self.count, max_batches)
        if state is None:
            self.order = torch.randperm(n, generator=generator, device=generator.device)
            self.next = 0
        else:
            self.order = state["order"].to(generator.device)
            generator.set_state(state["generator"])
            self.next = int(state["next"])

    def __len__(self):
        return self.count

    def __iter__(self):
        images, labels = self.data.splits["train"]
        while self.next < self.count:
            index = self.order[self.next * self.batch_size:(self.next + 1) * self.batch_size].to(images.device)
            batch = augment(images[index], self.generator, self.crop, self.pad, self.flip)
            self.next += 1
            yield _normalize(self.data, batch[self.share]), labels[index][self.share]

    def state_dict(self) -> dict:
        return dict(order=self.order.cpu(), generator=self.generator.get_state(), next=self.next)
