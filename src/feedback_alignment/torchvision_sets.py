"""torchvision's standard sets (cifar10, cifar100, mnist, fashion_mnist, svhn): fetched with
torchvision's download code, every md5 checked here (naming the address of a wrong one), then
unpacked and parsed by torchvision's own dataset classes, and cached as uint8 tensors.

A mirror's address and checksums replace the class's own through a subclass of the same name, so
a copy served anywhere (a local mirror, or a test's loopback server) goes through the same code.
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DataError, cache_splits


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


def _one_line(error: Exception) -> str:
    """torchvision's messages span lines (one per mirror tried); a DataError is one line."""
    return " ".join(str(error).split())


def _check_archive(archive: Path) -> None:
    """Refuse a tar archive with members that would land outside the folder it is unpacked in,
    or links: torchvision unpacks without a filter, so this check runs first."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if Path(member.name).is_absolute() or ".." in parts:
                    raise DataError(f"{archive.name}: member {member.name!r} would extract outside the target directory")
                if not (member.isfile() or member.isdir()):  # links (symbolic or hard) and devices
                    raise DataError(f"{archive.name}: member {member.name!r} is a link or special file; refused")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive.name}: not a readable tar.gz archive ({error})") from None


def _unpacked_fault(source: _Torchvision, cls, root: Path) -> str | None:
    """Which unpacked file is missing or has the wrong md5 (torchvision only says "corrupted")."""
    for filename, expected in source.unpacked(cls):
        found = next((path for path in root.rglob(filename) if path.is_file()), None)
        if found is None:
            return f"the archive lacks {filename}"
        digest = _md5(found) if expected else None
        if digest != expected:
            return f"{found.relative_to(root)} unpacked with md5 {digest}, expected {expected} (set md5 for it)"
    return None


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
                raise DataError(f"{name}: download from {address} failed: {_one_line(error)}") from None
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
            raise DataError(f"{name}: {_unpacked_fault(source, cls, workdir) or _one_line(error)}") from None
        cache_splits(out, name, kind, train_images, train_labels, test_images, test_labels, classes,
                     val_size, split_seed, image_size, source=url or mirror or source.downloads(cls, "")[0][0])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
