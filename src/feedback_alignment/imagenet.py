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
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetLoaders:
    def __init__(self, args, device: torch.device):
        manifest = json.loads(Path(args.data).read_text())
        self.args, self.device = args, device
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

    def _loader(self, dataset, shuffle: bool, generator=None):
        return DataLoader(dataset, batch_size=self.args.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda",
                          generator=generator, persistent_workers=False)

    def _batches(self, loader):
        for index, (images, labels) in enumerate(loader):
            if self.args.max_batches is not None and index >= self.args.max_batches:
                return
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))

    def train(self, epoch):
        generator = torch.Generator().manual_seed(self.args.seed * 100003 + epoch)
        return self._batches(self._loader(self.train_set, True, generator))

    def eval(self, split):
        return self._batches(self._loader(self.val_set, False))

    def train_batches_per_epoch(self):
        n = len(self.train_set) // self.args.batch_size
        return min(n, self.args.max_batches or n)
