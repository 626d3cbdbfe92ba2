"""Folders of images: `imagefolder` (train/, test/ and val/ with a folder per class: decoded into the
tensor cache, or with `stream: true` checked and described for DataLoader workers) and ImageNet
in place (class folders, or the official tarballs that torchvision unpacks there once).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import DataError, cache_splits
from .provenance import write_json

IMAGENET_TARBALLS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _class_folders(root: Path, split: str, name: str) -> dict[str, list[Path]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = root / split
    if not folder.is_dir():
        raise DataError(f"imagefolder {name!r}: {folder} not found (it needs train/ and test/, a folder per class)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder {name!r}: {folder} holds no class folders")
    files = {}
    for label in classes:
        files[label] = sorted(p for p in (folder / label).rglob("*")
                              if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS)
        if not files[label]:
            raise DataError(f"imagefolder {name!r}: class folder {folder / label} holds no images")
    return files


def _decode(path: Path, image_size: int | None) -> np.ndarray:
    """One image as uint8 H x W (grayscale) or H x W x 3, resized if asked."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in GRAYSCALE_MODES else "RGB")
            if image_size:
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for unreadable or cut files
        raise DataError(f"cannot read image {path}: {error}") from None


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """H x W x 3: a grayscale image's one channel repeated."""
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def _read_folder(files: dict[str, list[Path]], labels: dict[str, int], image_size: int | None):
    arrays, targets = [], []
    for label, paths in files.items():
        for path in paths:
            arrays.append(_decode(path, image_size))
            targets.append(labels[label])
    return arrays, np.asarray(targets, dtype=np.int64)


def _stack(arrays: list[np.ndarray], paths: list[Path], channels: int) -> np.ndarray:
    """N x C x H x W; grayscale images repeated over 3 channels when any image has colour."""
    shape = arrays[0].shape[:2]
    for array, path in zip(arrays, paths):
        if array.shape[:2] != shape:
            raise DataError(f"image {path} is {array.shape[1]}x{array.shape[0]}, {paths[0]} is "
                            f"{shape[1]}x{shape[0]}; set image_size to resize them all")
    if shape[0] != shape[1]:
        raise DataError(f"images are {shape[1]}x{shape[0]}, not square ({paths[0]}); set image_size")
    if channels == 1:
        return np.stack(arrays)[:, None]
    return np.stack([_as_rgb(a) for a in arrays]).transpose(0, 3, 1, 2)


def prepare_imagefolder(out: Path, name: str, kind: str = "imagefolder", path=None, val_size=None,
                        split_seed=0, image_size=None, stream=False) -> None:
    """Decode path/train, path/test (and path/val if there) into the cache, or with `stream`
    check every image and describe the folders in a manifest. Class folders must agree between
    the splits; without val/, val_size training images are held out (default: a tenth)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"imagefolder {name!r}: path {str(root)!r} does not exist or is not a directory")
    splits = ["train", "test"] + (["val"] if (root / "val").is_dir() else [])
    files = {split: _class_folders(root, split, name) for split in splits}
    classes = list(files["train"])
    for split in splits[1:]:
        if list(files[split]) != classes:
            missing = sorted(set(classes) ^ set(files[split]))
            raise DataError(f"imagefolder {name!r}: {root / split} and {root / 'train'} hold different class "
                            f"folders (not in both: {', '.join(missing[:5])})")
    if stream:
        _describe_folder(out, name, root, files, val_size, split_seed, image_size)
        return
    labels = {label: index for index, label in enumerate(classes)}
    decoded = {split: _read_folder(files[split], labels, image_size) for split in splits}
    paths = [p for split in splits for label in classes for p in files[split][label]]
    every = [a for split in splits for a in decoded[split][0]]
    channels = 1 if all(a.ndim == 2 for a in every) else 3
    stacked = iter(np.split(_stack(every, paths, channels), np.cumsum([len(decoded[s][1]) for s in splits])[:-1]))
    arrays = {split: (next(stacked), decoded[split][1]) for split in splits}
    if val_size is None:
        val_size = max(1, len(arrays["train"][1]) // 10)
    cache_splits(out, name, kind, *arrays["train"], *arrays["test"], len(classes), val_size, split_seed,
                  None, source=str(root.resolve()), val=arrays.get("val"))


STATISTICS_SAMPLE = 2000  # training images decoded to measure a streamed folder's mean and std


def _describe_folder(out, name, root: Path, files: dict, val_size, split_seed, image_size) -> None:
    """A streamed folder's manifest: its folders, classes and the held-out split, and its training
    images' per-channel mean and std (from a fixed sample, read as RGB like the loaders do).
    Every image is opened and checked first, so that a broken one stops this step, not a job."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    for path in (p for split in files.values() for paths in split.values() for p in paths):
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError) as error:
            raise DataError(f"cannot read image {path}: {error}") from None
    train_images = len(ImageFolder(root / "train").samples)  # as the loaders will count them
    has_val = "val" in files
    if val_size is None:
        val_size = max(1, train_images // 10)
    if not has_val and not 0 < val_size < train_images:
        raise DataError(f"{name}: val_size {val_size} must be between 0 and the {train_images} training images")
    every = [p for paths in files["train"].values() for p in paths]
    sample = np.random.RandomState(split_seed).permutation(len(every))[:STATISTICS_SAMPLE]
    decoded = [_as_rgb(_decode(every[i], image_size)) for i in sorted(sample)]
    pixels = np.concatenate([image.reshape(-1, 3) for image in decoded]).astype(np.float64) / 255
    write_json(out, dict(kind="imagefolder", name=name, layout="imagefolder", root=str(root.resolve()),
                         train=str((root / "train").resolve()), test=str((root / "test").resolve()),
                         val=str((root / "val").resolve()) if has_val else None, num_classes=len(files["train"]),
                         train_images=train_images, val_size=None if has_val else val_size, split_seed=split_seed,
                         image_size=image_size, mean=pixels.mean(0).tolist(), std=pixels.std(0).tolist()))




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
