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
                  one folder per class; grayscale or RGB detected; `image_size` resizes;
                  `stream: true` for a folder too large to keep decoded
- imagenet      : ILSVRC2012 in place (class folders or the official tarballs); streamed

Small datasets are decoded once into a uint8 tensor cache (.pt) that training keeps on its device;
imagenet and streamed folders are described by a manifest (.json) and read through DataLoader
workers. Images are normalized with the training split's per-channel mean and std (imagenet: its
usual ones); the classes come from the data.
Every failure is a DataError naming the file or address, raised before any training, and leaves no
cache behind (everything is unpacked in a temporary folder removed whatever happens).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data import DataError, prepare_digits
from .folders import prepare_imagefolder, prepare_imagenet
from .provenance import write_json
from .torchvision_sets import prepare_torchvision


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


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


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
    # True: a manifest (.json) and DataLoader workers; False: a uint8 tensor cache (.pt) on the device
    streams: Callable = lambda options: False
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


def _torchvision_kind(kind: str, address: Option, channels: int, side: int) -> Kind:  # pragma: no mutate block
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
                                                        "(default: a tenth)", int), SPLIT_SEED, IMAGE_SIZE,
                         Option("stream", False, "true: read through DataLoader workers (a folder too large "
                                "to keep decoded on the device) instead of the tensor cache", _boolean)),
         prepare_imagefolder, streams=lambda o: bool(o.get("stream")), required=("path",)),
    Kind("imagenet", (PATH, Option("val_size", 10000, "training images held out to select models", int),
                      SPLIT_SEED), _imagenet, streams=lambda o: True, required=("path",)),
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
