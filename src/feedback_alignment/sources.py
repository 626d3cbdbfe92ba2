"""Where a study's datasets come from: one record per kind, with its options and how it is prepared.

A config names its datasets freely and gives each a kind (a built-in's kind defaults to its name):

    datasets:
      mnist: {}                                            # kind mnist
      mnist5k: {kind: imagefolder, path: /data/mnist5k}    # train/ and test/, a folder per class

- digits        : scikit-learn's 8x8 handwritten digits (ships with scikit-learn; no network)
- cifar10, cifar100, mnist, fashion_mnist, svhn : torchvision's dataset classes, which download,
                  check md5s, unpack and parse; the address (`url` of the one archive for CIFAR,
                  `mirror` for the others) and the checksums (`md5`) can be set for a mirror's copy
- imagefolder   : a folder with train/ and test/ (and val/, or val_size images held out of train),
                  one folder per class; grayscale or RGB detected; `image_size` resizes
- imagenet      : ILSVRC2012 in place (class folders or the official tarballs); streamed

Every kind but imagenet is decoded once into a uint8 tensor cache (.pt) that training keeps on its
device; imagenet is described by a manifest (.json) and streams through DataLoader workers. Images
are normalized with the training split's per-channel mean and std; the classes come from the data.
Every failure is a DataError naming the file or address, raised before any training, and leaves no
cache behind (everything is unpacked in a temporary folder removed whatever happens).
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, prepare_digits, prepare_imagenet, split_off, write_cache
from .provenance import write_json


class OptionError(DataError):
    """An option a kind does not have, or lacks: `option` names it (the config key)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Option:
    """One setting of a dataset kind. `parse` turns the command line's text into the value."""
    name: str
    default: object
    help: str
    parse: Callable = str


def _md5_option(values: list[str]):
    """--md5 HEX (the one download's checksum) or --md5 FILE=HEX ... (any file's, by name)."""
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    pairs = [value.partition("=") for value in values]
    bad = [value for value, (_, equals, _) in zip(values, pairs) if not equals]
    if bad:
        raise DataError(f"--md5 {bad[0]!r}: give one checksum, or FILE=MD5 for each file")
    return {name: digest for name, _, digest in pairs}


VAL_SIZE = Option("val_size", 5000, "training images held out to select models", int)
SPLIT_SEED = Option("split_seed", 0, "seed of the held-out split", int)
IMAGE_SIZE = Option("image_size", None, "resize every image to this side (square), once, when cached", int)
MD5 = Option("md5", None, "checksums: one (the download's) or {file: md5}, for a mirror's copy; "
             "default: torchvision's", _md5_option)
URL = Option("url", None, "address of the archive (a mirror's); default: torchvision's")
MIRROR = Option("mirror", None, "base address the files are fetched from by their usual names; "
                "default: torchvision's first mirror")
PATH = Option("path", None, "the folder")


@dataclass(frozen=True)
class Kind:
    name: str
    options: tuple[Option, ...]
    prepare: Callable  # (out, name, **options) -> None
    shape: Callable = lambda options: None  # (channels, side) known before preparing, or None
    streams: bool = False  # True: a manifest (.json) and DataLoader workers; False: a tensor cache (.pt)
    required: tuple[str, ...] = ()

    def resolve(self, name: str, given: dict) -> dict:
        """The kind's options with defaults filled in; an option it does not have, or a
        required one missing, is refused naming the dataset."""
        known = {option.name: option for option in self.options}
        for key in given:
            if key not in known:
                raise OptionError(key, f"dataset {name!r} (kind {self.name}) has no option {key!r}; "
                                       f"its options: {', '.join(known) or 'none'}")
        for key in self.required:
            if given.get(key) is None:
                raise OptionError(key, f"dataset {name!r} (kind {self.name}) needs {key!r}")
        return {key: given.get(key, option.default) for key, option in known.items()}


# -- torchvision's standard sets -----------------------------------------------------------

@dataclass(frozen=True)
class _Torchvision:
    """How one torchvision dataset class is fetched and read. `family` says how its class
    stores addresses and checksums: mnist (mirrors + resources), cifar (url + tgz_md5 + the
    unpacked batches' md5s), svhn (split_list)."""
    class_name: str
    family: str
    splits: dict = field(default_factory=lambda: dict(train=dict(train=True), test=dict(train=False)))

    def base(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.class_name)

    def with_sources(self, address: str | None, md5: str | dict | None):
        """The class with the given address and checksums in place of its own: a subclass of the
        same name (MNIST's folders are named after the class)."""
        base = self.base()
        downloads = [name for _, name, _ in self.downloads(base, "")]
        if isinstance(md5, str):
            if len(downloads) != 1:
                raise DataError(f"{self.class_name} downloads {len(downloads)} files ({', '.join(downloads)}); "
                                "give md5 as {file: md5}")
            md5 = {downloads[0]: md5}
        md5 = md5 or {}
        known = downloads + [name for name, _ in self.unpacked(base)]
        unknown = sorted(set(md5) - set(known))
        if unknown:
            raise DataError(f"md5 for {unknown[0]!r}: {self.class_name} has no such file; its files: {', '.join(known)}")
        checked = lambda name, default: md5.get(name, default)  # noqa: E731
        if self.family == "mnist":
            attributes = dict(mirrors=[address] if address else base.mirrors[:1],
                              resources=[(name, checked(name, digest)) for name, digest in base.resources])
        elif self.family == "cifar":
            attributes = dict(url=address or base.url, tgz_md5=checked(base.filename, base.tgz_md5),
                              train_list=[[n, checked(n, d)] for n, d in base.train_list],
                              test_list=[[n, checked(n, d)] for n, d in base.test_list],
                              meta={**base.meta, "md5": checked(base.meta["filename"], base.meta["md5"])})
        else:
            attributes = dict(split_list={split: [f"{address}{name}" if address else url, name, checked(name, digest)]
                                          for split, (url, name, digest) in base.split_list.items()})
        return type(base.__name__, (base,), attributes)

    def downloads(self, cls, root) -> list[tuple[str, str, Path]]:
        """(address, file name, where the class looks for it) of every file it downloads."""
        root = Path(root)
        if self.family == "mnist":
            return [(f"{cls.mirrors[0]}{name}", name, root / cls.__name__ / "raw") for name, _ in cls.resources]
        if self.family == "cifar":
            return [(cls.url, cls.filename, root)]
        return [(cls.split_list[split][0], cls.split_list[split][1], root) for split in self.splits]

    def unpacked(self, cls) -> list[tuple[str, str | None]]:
        """(file name, md5) of the files the class checks after unpacking (CIFAR's batches)."""
        if self.family != "cifar":
            return []
        return [(n, d) for n, d in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]

    def md5_of(self, cls, name: str) -> str | None:
        if self.family == "mnist":
            return dict(cls.resources)[name]
        if self.family == "cifar":
            return cls.tgz_md5
        return next(digest for _, file, digest in cls.split_list.values() if file == name)

    def read(self, cls, root, split: str):
        """One split as (uint8 images N x C x H x W, int64 labels, class count)."""
        if self.family == "svhn":
            dataset = cls(str(root), split=split, download=True)
            return np.asarray(dataset.data), np.asarray(dataset.labels), 10
        dataset = cls(str(root), download=True, **self.splits[split])
        images = np.asarray(dataset.data)
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)  # N x C x H x W
        return images, np.asarray(dataset.targets), len(dataset.classes)


TORCHVISION = {
    "cifar10": _Torchvision("CIFAR10", "cifar"),
    "cifar100": _Torchvision("CIFAR100", "cifar"),
    "mnist": _Torchvision("MNIST", "mnist"),
    "fashion_mnist": _Torchvision("FashionMNIST", "mnist"),
    "svhn": _Torchvision("SVHN", "svhn", splits=dict(train={}, test={})),
}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_archive(archive: Path) -> None:
    """Refuse a tar archive with members that would land outside the folder it is unpacked in,
    or links: torchvision unpacks without a filter, so this check runs first."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if Path(member.name).is_absolute() or ".." in parts:
                    raise DataError(f"{archive.name}: member {member.name!r} would extract outside the target directory")
                if member.issym() or member.islnk() or not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive.name}: member {member.name!r} is a link or special file; refused")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive.name}: not a readable tar.gz archive ({error})") from None


def prepare_torchvision(out: Path, name: str, kind: str, url=None, mirror=None, md5=None,
                        val_size=5000, split_seed=0, image_size=None) -> None:
    """Fetch with torchvision's download code, check every md5 (naming the address of a wrong
    one), let torchvision's class unpack and read the files, hold out val_size training images,
    cache. All in a temporary folder beside `out`, removed whatever happens."""
    from torchvision.datasets.utils import download_url

    source = TORCHVISION[kind]
    cls = source.with_sources(url or mirror, md5)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-download-"))
    try:
        for address, filename, folder in source.downloads(cls, workdir):
            try:
                download_url(address, str(folder), filename=filename, md5=None)
            except Exception as error:  # urllib/http errors come in many types; name the address
                raise DataError(f"{name}: download from {address} failed: {error}") from None
            expected, found = source.md5_of(cls, filename), _md5(folder / filename)
            if expected and found != expected:
                raise DataError(f"{name}: md5 of {address} is {found}, expected {expected} "
                                f"(truncated or wrong file; set datasets.{name}.md5 for a mirror's copy)")
            if ".tar" in filename:
                _check_archive(folder / filename)
        try:
            (train_images, train_labels, classes), (test_images, test_labels, _) = (
                source.read(cls, workdir, split) for split in ("train", "test"))
        except (RuntimeError, OSError, ValueError, KeyError, EOFError) as error:
            raise DataError(f"{name}: {_unpacked_fault(source, cls, workdir) or error}") from None
        _cache_splits(out, name, kind, train_images, train_labels, test_images, test_labels, classes,
                      val_size, split_seed, image_size, source=url or mirror or source.downloads(cls, "")[0][0])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _unpacked_fault(source: _Torchvision, cls, root: Path) -> str | None:
    """Which unpacked file is missing or has the wrong md5 (torchvision only says "corrupted")."""
    for filename, expected in source.unpacked(cls):
        found = next(root.rglob(filename), None)
        if found is None:
            return f"the archive lacks {filename}"
        if expected and _md5(found) != expected:
            return f"{found.relative_to(root)} unpacked with md5 {_md5(found)}, expected {expected} (set md5 for it)"
    return None


def _resize(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 N x C x H x W to side x side (bilinear, antialiased), in chunks."""
    chunks = [F.interpolate(torch.from_numpy(images[i:i + 4096]).float(), size=(side, side), mode="bilinear",
                            antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8).numpy()
              for i in range(0, len(images), 4096)]
    return np.concatenate(chunks) if chunks else images


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1], accumulated in float64 by chunks."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for i in range(0, len(images), 4096):
        chunk = images[i:i + 4096].astype(np.float64) / 255
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk ** 2).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(squares / count - mean ** 2, 0)).tolist()


def _cache_splits(out, name, kind, train_images, train_labels, test_images, test_labels, classes,
                  val_size, split_seed, image_size, source, val=None) -> None:
    """Resize, hold out validation images (unless `val` is given), normalize from train, cache."""
    if image_size:
        train_images, test_images = _resize(train_images, image_size), _resize(test_images, image_size)
        if val is not None:
            val = (_resize(val[0], image_size), val[1])
    if val is None:
        if not 0 < val_size < len(train_labels):
            raise DataError(f"{name}: val_size {val_size} must be between 0 and the {len(train_labels)} training images")
        train, val = split_off(train_images, train_labels, val_size, split_seed)
    else:
        train = (train_images, train_labels)
    mean, std = _channel_stats(train[0])
    write_cache(out, name, dict(train=train, val=val, test=(test_images, test_labels)), classes, mean, std,
                source, kind=kind)


# -- a folder of images per class ------------------------------------------------------------

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
    return np.stack([np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]).transpose(0, 3, 1, 2)


def prepare_imagefolder(out: Path, name: str, kind: str = "imagefolder", path=None, val_size=None,
                        split_seed=0, image_size=None) -> None:
    """Decode path/train, path/test (and path/val if there) into the cache. Class folders must
    agree between the splits; without val/, val_size training images are held out (default: a
    tenth)."""
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
    labels = {label: index for index, label in enumerate(classes)}
    decoded = {split: _read_folder(files[split], labels, image_size) for split in splits}
    paths = [p for split in splits for label in classes for p in files[split][label]]
    every = [a for split in splits for a in decoded[split][0]]
    channels = 1 if all(a.ndim == 2 for a in every) else 3
    stacked = iter(np.split(_stack(every, paths, channels), np.cumsum([len(decoded[s][1]) for s in splits])[:-1]))
    arrays = {split: (next(stacked), decoded[split][1]) for split in splits}
    if val_size is None:
        val_size = max(1, len(arrays["train"][1]) // 10)
    _cache_splits(out, name, kind, *arrays["train"], *arrays["test"], len(classes), val_size, split_seed,
                  None, source=str(root.resolve()), val=arrays.get("val"))


# -- the registry ------------------------------------------------------------------------------

def _torchvision_kind(kind: str, address: Option, channels: int, side: int) -> Kind:
    return Kind(kind, (address, MD5, VAL_SIZE, SPLIT_SEED, IMAGE_SIZE),
                lambda out, name, **o: prepare_torchvision(out, name, kind, **o),
                shape=lambda o: (channels, o.get("image_size") or side))


def _imagenet(out, name, path, val_size, split_seed):
    write_json(out, dict(prepare_imagenet(path, val_size=val_size, split_seed=split_seed), kind="imagenet"))


def _digits(out, name, val_size, split_seed):
    prepare_digits(out, val_size=val_size, split_seed=split_seed, name=name)


KINDS = {kind.name: kind for kind in [
    Kind("digits", (Option("val_size", 180, "training images held out", int), SPLIT_SEED), _digits,
         shape=lambda o: (1, 8)),
    _torchvision_kind("cifar10", URL, 3, 32),
    _torchvision_kind("cifar100", URL, 3, 32),
    _torchvision_kind("mnist", MIRROR, 1, 28),
    _torchvision_kind("fashion_mnist", MIRROR, 1, 28),
    _torchvision_kind("svhn", MIRROR, 3, 32),
    Kind("imagefolder", (PATH, Option("val_size", None, "training images held out when there is no val/ "
                                                        "(default: a tenth)", int), SPLIT_SEED, IMAGE_SIZE),
         prepare_imagefolder, required=("path",)),
    Kind("imagenet", (PATH, Option("val_size", 10000, "training images held out to select models", int),
                      SPLIT_SEED), _imagenet, shape=lambda o: None, streams=True, required=("path",)),
]}


def get_kind(name: str, config: dict) -> Kind:
    """A dataset's kind: `kind` in its config, or its name when that is a kind."""
    kind = config.get("kind", name)
    if kind not in KINDS:
        what = f"unknown kind {kind!r}" if "kind" in config else f"{name!r} is not a kind and sets no kind"
        raise DataError(f"dataset {name!r}: {what}; choose from {', '.join(KINDS)}")
    return KINDS[kind]


def prepare(out: str | Path, name: str, config: dict) -> None:
    """Prepare dataset `name` (its config: kind and options) into `out` (.pt cache or .json manifest)."""
    kind = get_kind(name, config)
    options = kind.resolve(name, {k: v for k, v in config.items() if k not in ("kind", "augment")})
    kind.prepare(Path(out), name, **options)
