"""Batches of ImageNet, or of an image folder prepared with `stream: true`, through DataLoader
workers (too large to keep on the device). The prepare step's manifest names the folders.

Training: RandomResizedCrop + horizontal flip; evaluation: resize to 8/7 of the crop, center crop
(the PyTorch ImageNet example, as used by Xiao et al.). ImageNet's test labels are not public, so
models are selected on a held-out slice of the training images (the manifest's val_size, a fixed
split seed) and the official validation set is the reported test split: each is evaluated once
per epoch. An image folder's test/ is its test split, and its val/ (if it has one) selects.
Images are read as RGB; ImageNet is normalized with its usual mean and std, a folder with its
training images' (measured by the prepare step).

The workers stay alive from epoch to epoch (persistent), prefetch batches ahead of the step, and
on a GPU hand them over in pinned memory, so that the copy to the device runs beside the step.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision import datasets, transforms

from .data import DataError, epoch_seed
from .distributed import World

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREFETCH_BATCHES = 4  # per worker


class _Order(Sampler):
    """The images of the current epoch's remaining batches, in order, as (epoch, position) keys;
    set before each epoch, so that one DataLoader (and its persistent workers) serves every epoch."""

    def __init__(self):
        self.indices: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class _Augmented(torch.utils.data.Dataset):
    """The training images, each augmented with random draws seeded by (run seed, epoch, image):
    the same crops and flips whichever process or worker loads the image, so that a run gives
    the same batches with any number of processes and workers. The draws happen in a forked
    random state: the loading process's own stream is left as it was (workers=0 loads in the
    training process)."""

    def __init__(self, images: Subset, seed: int):
        self.images, self.seed = images, seed

    def __len__(self):
        return len(self.images)

    def seed_of(self, epoch: int, position: int) -> int:
        return epoch_seed(self.seed, epoch) * 1_000_003 + position

    def __getitem__(self, key: tuple[int, int]):
        epoch, position = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_of(epoch, position))
            return self.images[position]


class StreamedLoaders:
    def __init__(self, config: dict, device: torch.device, world: World = World()):
        manifest = json.loads(Path(config["data"]).read_text())
        self.config, self.device, self.world = config, device, world
        self.num_classes = int(manifest["num_classes"])
        self.kind = manifest.get("kind", "imagenet")
        self.in_channels = 3
        self.image_size = config["crop"] or manifest.get("image_size") or 224
        normalize = transforms.Normalize(manifest.get("mean", MEAN), manifest.get("std", STD))
        train_transform = transforms.Compose([
            transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), normalize])
        eval_transform = transforms.Compose([
            transforms.Resize(round(self.image_size * 8 / 7)), transforms.CenterCrop(self.image_size),
            transforms.ToTensor(), normalize])
        root = Path(manifest["root"])
        train = Path(manifest.get("train", root / "train"))
        every_train_image = datasets.ImageFolder(train, train_transform)
        if len(every_train_image) != manifest["train_images"]:
            raise DataError(f"{self.kind} {str(train)!r} holds {len(every_train_image)} images, "
                            f"{manifest['train_images']} when it was prepared; prepare it again")
        test = datasets.ImageFolder(manifest.get("test", root / "val"), eval_transform)
        if manifest.get("val"):
            self.train_set = Subset(every_train_image, range(len(every_train_image)))
            self.eval_sets = {"val": datasets.ImageFolder(manifest["val"], eval_transform), "test": test}
        else:
            generator = torch.Generator().manual_seed(int(manifest["split_seed"]))
            order = torch.randperm(len(every_train_image), generator=generator)
            held_out = sorted(order[:manifest["val_size"]].tolist())
            self.train_set = Subset(every_train_image, sorted(order[manifest["val_size"]:].tolist()))
            # The held-out images through the evaluation transform: the same file list, not a rescan.
            evaluated_train = copy.copy(every_train_image)
            evaluated_train.transform = eval_transform
            self.eval_sets = {"val": Subset(evaluated_train, held_out), "test": test}
        workers = config.get("workers")
        self.workers = workers if workers is not None else (config.get("threads") or 4)
        self._order = _Order()
        self._train_loader: DataLoader | None = None
        self._eval_loaders: dict[str, DataLoader] = {}

    def _loader(self, dataset, batch_size: int, sampler=None, drop_last=False) -> DataLoader:
        workers = self.workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, prefetch_factor=PREFETCH_BATCHES if workers else None)

    def _to_device(self, batches):
        for images, labels in batches:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def train(self, epoch, state=None):
        return _ImageNetEpoch(self, epoch, state)

    def eval(self, split):
        if split not in self._eval_loaders:
            # Under data parallelism each rank takes every world_size-th image.
            dataset = self.eval_sets[split]
            share = Subset(dataset, range(self.world.rank, len(dataset), self.world.size))
            self._eval_loaders[split] = self._loader(share, self.config["batch_size"])
        for index, batch in enumerate(self._to_device(self._eval_loaders[split])):
            if self.config["max_batches"] is not None and index >= self.config["max_batches"]:
                return
            yield batch

    def train_loader(self, epoch: int, indices: list[int], batch_size: int) -> DataLoader:
        """The one training DataLoader, now serving `indices` (positions in train_set) of `epoch`."""
        self._order.indices = [(epoch, index) for index in indices]
        if self._train_loader is None:
            augmented = _Augmented(self.train_set, int(self.config["seed"]))
            self._train_loader = self._loader(augmented, batch_size, sampler=self._order, drop_last=True)
        return self._train_loader

    def probe_batch(self, size):
        """A fixed batch (the first held-out images) for the alignment measurements."""
        loader = DataLoader(self.eval_sets["val"], batch_size=size, num_workers=0)
        images, labels = next(iter(loader))
        return images.to(self.device), labels.to(self.device)

    def train_batches_per_epoch(self):
        n = len(self.train_set) // self.config["batch_size"]
        return min(n, self.config["max_batches"] or n)


class _ImageNetEpoch:
    """One training epoch in a fixed shuffled order (seeded by seed and epoch), resumable at a
    batch: its state is the index of the next batch. The augmentation is seeded per image too
    (_Augmented). Under data parallelism each rank loads only its share of every global batch."""

    def __init__(self, loaders: StreamedLoaders, epoch: int, state: dict | None):
        self.loaders, self.epoch = loaders, epoch
        generator = torch.Generator().manual_seed(epoch_seed(loaders.config["seed"], epoch))
        self.order = torch.randperm(len(loaders.train_set), generator=generator)
        self.next = int(state["next"]) if state else 0

    def __iter__(self):
        loaders, batch_size = self.loaders, self.loaders.config["batch_size"]
        count = loaders.train_batches_per_epoch()
        share = loaders.world.share(batch_size)
        remaining = self.order[self.next * batch_size:count * batch_size].view(-1, batch_size)
        loader = loaders.train_loader(self.epoch, remaining[:, share].flatten().tolist(), share.stop - share.start)
        for batch in loaders._to_device(loader):
            self.next += 1
            yield batch

    def state_dict(self) -> dict:
        return dict(next=self.next)
