"""Datasets: the tensor cache and how batches are served from it (sources.py prepares them).

- digits : scikit-learn's 8x8 handwritten digits (ships with scikit-learn; no network), prepared here
- the other cached kinds (torchvision_sets.py, folders.py) arrive as uint8 arrays: cache_splits
  resizes them, holds out the validation images and measures the training split's mean and std

Cached datasets live on the device as uint8 and are augmented there as tensors (random crop with
padding, horizontal flip), so no DataLoader workers sit in the hot path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .provenance import torch_save

class DataError(ValueError):
    """A dataset is missing, corrupt or malformed; the message says which and where."""


def split_off(images: np.ndarray, labels: np.ndarray, holdout: int, seed: int):
    """(the rest, `holdout` images drawn with `seed`): the held-out split that selects models."""
    order = np.random.RandomState(seed).permutation(len(labels))
    return (images[order[holdout:]], labels[order[holdout:]]), (images[order[:holdout]], labels[order[:holdout]])


def write_cache(path: Path, name: str, splits: dict, num_classes: int, mean, std, source: str,
                kind: str | None = None) -> None:
    """The cache: uint8 images and int64 labels per split, the class count and the training
    split's per-channel mean and std (in [0, 1])."""
    record = dict(name=name, kind=kind or name, num_classes=num_classes, mean=list(mean), std=list(std),
                  source=source)
    for split, (images, labels) in splits.items():
        record[f"{split}_images"] = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.uint8)
        record[f"{split}_labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    torch_save(path, record)


def prepare_digits(out: Path, val_size: int = 180, test_size: int = 360, split_seed: int = 0,
                   name: str = "digits") -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # N x 1 x 8 x 8
    labels = digits.target.astype(np.int64)
    if val_size + test_size >= len(labels):
        raise DataError(f"digits has {len(labels)} images; val_size + test_size must leave some to train")
    rest, test = split_off(images, labels, test_size, split_seed)
    train, val = split_off(*rest, val_size, split_seed + 1)
    mean, std = float(train[0].mean() / 255), float(train[0].std() / 255)
    write_cache(out, name, dict(train=train, val=val, test=test), 10, (mean,), (std,),
                "sklearn.datasets.load_digits", kind="digits")


def resize(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 N x C x H x W to side x side (bilinear, antialiased), in chunks. The filter's weights
    are non-negative and sum to 1, so every value stays within [0, 255]: no clamp is needed."""
    chunks = [F.interpolate(torch.from_numpy(images[i:i + 4096]).float(), size=(side, side), mode="bilinear",
                            antialias=True, align_corners=False).round_().to(torch.uint8).numpy()
              for i in range(0, len(images), 4096)]
    return np.concatenate(chunks) if chunks else np.empty((0, images.shape[1], side, side), np.uint8)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1], accumulated in float64 by chunks."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for i in range(0, len(images), 4096):
        chunk = images[i:i + 4096] / 255.0  # float64
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk ** 2).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(squares / count - mean ** 2, 0)).tolist()


def cache_splits(out, name, kind, train_images, train_labels, test_images, test_labels, classes,
                 val_size, split_seed, image_size, source, val=None) -> None:
    """Resize, hold out validation images (unless `val` is given, at the images' size), normalize
    from train, cache."""
    if image_size:
        train_images, test_images = resize(train_images, image_size), resize(test_images, image_size)
    if val is None:
        if not 0 < val_size < len(train_labels):
            raise DataError(f"{name}: val_size {val_size} must be between 0 and the {len(train_labels)} training images")
        train, val = split_off(train_images, train_labels, val_size, split_seed)
    else:
        train = (train_images, train_labels)
    mean, std = channel_stats(train[0])
    write_cache(out, name, dict(train=train, val=val, test=(test_images, test_labels)), classes, mean, std,
                source, kind=kind)


# -- serving ------------------------------------------------------------------------------

@dataclass
class TensorData:
    """A cached dataset on one device: uint8 images N x C x H x W, int64 labels, per split."""
    name: str
    kind: str
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
    return TensorData(record["name"], record.get("kind", record["name"]), splits, int(record["num_classes"]),
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
    """The middle crop x crop (a view); with an odd margin, one pixel more on the bottom and right."""
    offset = (images.shape[-1] - crop) // 2
    return images[..., offset:offset + crop, offset:offset + crop]


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
