"""ImageNet batches through DataLoader workers (too large to keep on the device).

Training: RandomResizedCrop + horizontal flip; evaluation: resize to 8/7 of the crop, center crop
(the PyTorch ImageNet example, as used by Xiao et al.). ImageNet's test labels are not public:
the official validation set serves as both the model-selection and the reported split, as in
the peers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from .data import epoch_seed
from .distributed import World

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetLoaders:
    def __init__(self, args, device: torch.device, world: World = World()):
        manifest = json.loads(Path(args.data).read_text())
        self.args, self.device, self.world = args, device, world
        self.num_classes = int(manifest["num_classes"])
        self.in_channels = 3
        self.image_size = args.crop or 224
        normalize = transforms.Normalize(MEAN, STD)
        train_transform = transforms.Compose([
            transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), normalize])
        eval_transform = transforms.Compose([
            transforms.Resize(round(self.image_size * 8 / 7)), transforms.CenterCrop(self.image_size),
            transforms.ToTensor(), normalize])
        root = Path(manifest["root"])
        if manifest["layout"] == "imagefolder":
            self.train_set = datasets.ImageFolder(root / "train", train_transform)
            self.val_set = datasets.ImageFolder(root / "val", eval_transform)
        else:
            self.train_set = datasets.ImageNet(root, "train", transform=train_transform)
            self.val_set = datasets.ImageNet(root, "val", transform=eval_transform)
        self.workers = args.workers if args.workers is not None else (args.threads or 4)

    def train(self, epoch, state=None):
        return _ImageNetEpoch(self, epoch, state)

    def eval(self, split):
        # Under data parallelism each rank takes every world_size-th image.
        images = Subset(self.val_set, range(self.world.rank, len(self.val_set), self.world.size))
        loader = DataLoader(images, batch_size=self.args.batch_size, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda")
        for index, (images, labels) in enumerate(loader):
            if self.args.max_batches is not None and index >= self.args.max_batches:
                return
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def probe_batch(self, size):
        """A fixed batch (the first validation images) for the alignment measurements."""
        loader = DataLoader(self.val_set, batch_size=size, num_workers=0)
        images, labels = next(iter(loader))
        return images.to(self.device), labels.to(self.device)

    def train_batches_per_epoch(self):
        n = len(self.train_set) // self.args.batch_size
        return min(n, self.args.max_batches or n)


class _ImageNetEpoch:
    """One training epoch in a fixed shuffled order (seeded by seed and epoch), resumable at a
    batch: its state is the index of the next batch. (Augmentation in the workers is random and
    not replayed; ImageNet resumes continue the same image order, not bit-identical batches.)
    Under data parallelism each rank loads only its share of every global batch."""

    def __init__(self, loaders: ImageNetLoaders, epoch: int, state: dict | None):
        self.loaders = loaders
        generator = torch.Generator().manual_seed(epoch_seed(loaders.args.seed, epoch))
        self.order = torch.randperm(len(loaders.train_set), generator=generator)
        self.next = int(state["next"]) if state else 0

    def __iter__(self):
        loaders, batch_size = self.loaders, self.loaders.args.batch_size
        count = loaders.train_batches_per_epoch()
        share = loaders.world.share(batch_size)
        remaining = self.order[self.next * batch_size:count * batch_size].view(-1, batch_size)
        remaining = remaining[:, share].flatten().tolist()
        loader = DataLoader(loaders.train_set, batch_size=share.stop - share.start, sampler=remaining,
                            drop_last=True,
                            num_workers=loaders.workers, pin_memory=loaders.device.type == "cuda")
        for images, labels in loader:
            self.next += 1
            yield (images.to(loaders.device, non_blocking=True),
                   labels.to(loaders.device, non_blocking=True))

    def state_dict(self) -> dict:
        return dict(next=self.next)
