"""Dataset kinds: torchvision's standard sets fetched over a loopback HTTP server from files the
test writes in each set's real format, image folders, and every bad input as one line."""
import gzip
import hashlib
import json
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from feedback_alignment import prepare as prepare_cli
from feedback_alignment.data import DataError, load_tensor_data
from feedback_alignment.sources import KINDS, prepare

TRAIN, TEST = 40, 12  # images per split in the files the tests serve


def _md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


def _images(rng, count: int, shape: tuple, classes: int, first_pixel_is_label=True):
    """uint8 images whose first pixel is their label (lets a test see that images and labels stay
    paired through reading, splitting and caching)."""
    labels = np.arange(count) % classes
    images = rng.randint(0, 256, (count, *shape), dtype=np.uint8)
    if first_pixel_is_label:
        images.reshape(count, -1)[:, 0] = labels
    return images, labels


def _idx(array: np.ndarray) -> bytes:
    """MNIST's idx format: a magic number (0x08 = uint8, then the rank), the sizes, the bytes."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def serve_mnist(served: Path) -> dict:
    """The four gzipped idx files of MNIST (and Fashion-MNIST): {file: md5}."""
    rng = np.random.RandomState(0)
    files = {}
    for prefix, count in (("train", TRAIN), ("t10k", TEST)):
        images, labels = _images(rng, count, (28, 28), 10)
        files[f"{prefix}-images-idx3-ubyte.gz"] = _idx(images)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx(labels)
    for name, payload in files.items():
        (served / name).write_bytes(payload)
    return {name: _md5(payload) for name, payload in files.items()}


def cifar_archive(served: Path, kind: str, extra_member: tarfile.TarInfo | None = None,
                  archive_name: str | None = None) -> dict:
    """The python-format archive of CIFAR-10 (5 training batches, a test batch, batches.meta) or
    CIFAR-100 (train, test, meta): pickled dicts with 'data' (N x 3072 uint8, channel-major) and
    'labels' or 'fine_labels'. Returns {file: md5} for the archive and every file in it."""
    rng = np.random.RandomState(1)
    if kind == "cifar10":
        folder, classes, label_key = "cifar-10-batches-py", 10, "labels"
        parts = {f"data_batch_{i}": TRAIN // 5 for i in range(1, 6)} | {"test_batch": TEST}
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder, classes, label_key = "cifar-100-python", 100, "fine_labels"
        parts = {"train": TRAIN, "test": TEST}
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    payloads = {}
    for name, count in parts.items():
        images, labels = _images(rng, count, (3, 32, 32), classes)
        payloads[name] = pickle.dumps({"data": images.reshape(count, -1), label_key: labels.tolist()}, protocol=2)
    payloads[meta[0]] = pickle.dumps(meta[1], protocol=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in payloads.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if extra_member is not None:
            tar.addfile(extra_member, io.BytesIO(b"x" * extra_member.size))
    archive = archive_name or f"{folder.split('-batches')[0].replace('-python', '')}-python.tar.gz"
    (served / archive).write_bytes(buffer.getvalue())
    return {archive: _md5(buffer.getvalue())} | {name: _md5(payload) for name, payload in payloads.items()}


def serve_svhn(served: Path) -> dict:
    """SVHN's .mat files: X is 32 x 32 x 3 x N, y is N x 1 with the digit 0 labelled 10."""
    rng = np.random.RandomState(2)
    md5 = {}
    for split, count in (("train", TRAIN), ("test", TEST)):
        images, labels = _images(rng, count, (3, 32, 32), 10)
        path = served / f"{split}_32x32.mat"
        scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": np.where(labels == 0, 10, labels)[:, None]})
        md5[path.name] = _md5(path.read_bytes())
    return md5


def served_config(kind: str, served: Path, base: str) -> dict:
    """A dataset config that fetches `kind` from the loopback server with the served files' md5s."""
    if kind in ("cifar10", "cifar100"):
        md5 = cifar_archive(served, kind)
        archive = next(name for name in md5 if name.endswith(".tar.gz"))
        return dict(kind=kind, url=f"{base}/{archive}", md5=md5, val_size=8)
    md5 = serve_svhn(served) if kind == "svhn" else serve_mnist(served)
    return dict(kind=kind, mirror=f"{base}/", md5=md5, val_size=8)


TORCHVISION_KINDS = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "mnist": (1, 28, 10),
                     "fashion_mnist": (1, 28, 10), "svhn": (3, 32, 10)}


@pytest.mark.parametrize("kind", TORCHVISION_KINDS)
def test_torchvision_kind_downloads_checks_and_caches(tmp_path, loopback_server, kind):
    served, base = loopback_server
    out = tmp_path / "data" / "mine.pt"
    prepare(out, "mine", served_config(kind, served, base))
    record = torch.load(out, weights_only=True)
    channels, side, classes = TORCHVISION_KINDS[kind]
    assert record["name"] == "mine" and record["kind"] == kind and record["num_classes"] == classes
    assert record["train_images"].shape == (TRAIN - 8, channels, side, side)
    assert record["val_images"].shape == (8, channels, side, side)
    assert record["test_images"].shape == (TEST, channels, side, side)
    assert record["train_images"].dtype == torch.uint8
    for split in ("train", "val", "test"):  # images and labels stayed paired (SVHN's 10 became 0)
        first_pixel = record[f"{split}_images"].flatten(1)[:, 0].long()
        assert torch.equal(first_pixel, record[f"{split}_labels"])
    # Normalization from the training split only, per channel.
    train = record["train_images"].double() / 255
    torch.testing.assert_close(torch.tensor(record["mean"], dtype=torch.float64), train.mean((0, 2, 3)), rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.tensor(record["std"], dtype=torch.float64), train.transpose(0, 1).flatten(1).std(1, unbiased=False),
                               rtol=0, atol=1e-9)
    assert [p.name for p in out.parent.iterdir()] == ["mine.pt"]  # the download folder is gone


def test_the_prepare_cli_takes_a_kinds_options_and_resizes(tmp_path, loopback_server):
    served, base = loopback_server
    md5 = serve_mnist(served)
    out = tmp_path / "fmnist.pt"
    prepare_cli.main(["--name", "fmnist", "--kind", "fashion_mnist", "--out", str(out), "--mirror", f"{base}/",
                      "--md5", *[f"{name}={digest}" for name, digest in md5.items()], "--val-size", "4",
                      "--image-size", "32"])
    loaded = load_tensor_data(out, torch.device("cpu"))
    assert loaded.kind == "fashion_mnist" and loaded.image_size == 32 and loaded.in_channels == 1
    assert [len(labels) for _, labels in loaded.splits.values()] == [TRAIN - 4, 4, TEST]


def test_a_wrong_checksum_names_the_address_and_leaves_nothing(tmp_path, loopback_server):
    served, base = loopback_server
    config = served_config("mnist", served, base)
    config["md5"]["t10k-labels-idx1-ubyte.gz"] = "0" * 32
    out = tmp_path / "data" / "mnist.pt"
    with pytest.raises(DataError) as error:
        prepare(out, "mnist", config)
    message = str(error.value)
    assert f"md5 of {base}/t10k-labels-idx1-ubyte.gz is " in message and "\n" not in message
    assert list(out.parent.iterdir()) == []


def test_a_file_in_the_archive_with_a_wrong_checksum_is_named(tmp_path, loopback_server):
    served, base = loopback_server
    config = served_config("cifar10", served, base)
    config["md5"]["data_batch_3"] = "f" * 32
    out = tmp_path / "data" / "cifar10.pt"
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_3 unpacked with md5 \w+, expected f{32}"):
        prepare(out, "cifar10", config)
    assert list(out.parent.iterdir()) == []


def test_torchvisions_own_checksums_apply_by_default(tmp_path, loopback_server):
    # The served archive is not CIFAR-10: torchvision's md5 of the real one refuses it.
    served, base = loopback_server
    cifar_archive(served, "cifar10")
    with pytest.raises(DataError, match="expected c58f30108f718f92721af3b95e74349a"):
        prepare(tmp_path / "c.pt", "cifar10", dict(url=f"{base}/cifar-10-python.tar.gz"))


def test_unreachable_address_and_unknown_checksum_file(tmp_path, loopback_server):
    _, base = loopback_server
    out = tmp_path / "data" / "s.pt"
    with pytest.raises(DataError, match=f"download from {base}/train_32x32.mat failed"):
        prepare(out, "svhn", dict(mirror=f"{base}/"))
    with pytest.raises(DataError, match="md5 for 'train.bin': SVHN has no such file"):
        prepare(out, "svhn", dict(mirror=f"{base}/", md5={"train.bin": "0" * 32}))
    with pytest.raises(DataError, match="SVHN downloads 2 files"):
        prepare(out, "svhn", dict(mirror=f"{base}/", md5="0" * 32))
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("member, message", [
    ("../escape.txt", "would extract outside"),
    ("/tmp/absolute.txt", "would extract outside"),
    ("cifar-10-batches-py/../../up.txt", "would extract outside"),
    ("link", "is a link or special file"),
])
def test_archive_members_that_escape_or_link_are_refused(tmp_path, loopback_server, member, message):
    served, base = loopback_server
    info = tarfile.TarInfo(member)
    if member == "link":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        info.size = 1
    md5 = cifar_archive(served, "cifar10", extra_member=info)
    out = tmp_path / "data" / "cifar10.pt"
    with pytest.raises(DataError, match=message):
        prepare(out, "cifar10", dict(url=f"{base}/cifar-10-python.tar.gz", md5=md5))
    assert list(out.parent.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_a_truncated_archive_is_refused(tmp_path, loopback_server):
    served, base = loopback_server
    cifar_archive(served, "cifar10")
    whole = (served / "cifar-10-python.tar.gz").read_bytes()
    (served / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="not a readable tar.gz archive"):
        prepare(tmp_path / "c.pt", "cifar10", dict(url=f"{base}/cut.tar.gz", md5=_md5(whole[: len(whole) // 2])))


# -- image folders -----------------------------------------------------------------------------

def image_folder(root: Path, classes=("cat", "dog"), per_class=(10, 3), mode="L", size=(10, 10), val=0):
    """train/ and test/ (and val/ when val > 0) with a folder of PNGs per class; each image's
    first pixel is its class index."""
    rng = np.random.RandomState(3)
    for split, count in (("train", per_class[0]), ("test", per_class[1]), ("val", val)):
        for index, label in enumerate(classes):
            folder = root / split / label
            for number in range(count):
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.randint(0, 256, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]),
                                     dtype=np.uint8)
                pixels.reshape(-1)[0] = index
                if mode == "RGB":
                    pixels[0, 0] = index
                Image.fromarray(pixels, mode).save(folder / f"{number}.png")
    return root


def test_an_image_folder_is_cached_with_its_classes_and_a_held_out_tenth(tmp_path):
    root = image_folder(tmp_path / "pets")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # skipped, as ImageFolder does
    out = tmp_path / "pets.pt"
    prepare(out, "pets", dict(kind="imagefolder", path=str(root)))
    record = torch.load(out, weights_only=True)
    assert record["kind"] == "imagefolder" and record["num_classes"] == 2
    assert record["train_images"].shape == (18, 1, 10, 10) and record["val_images"].shape == (2, 1, 10, 10)
    assert record["test_images"].shape == (6, 1, 10, 10)
    for split in ("train", "val", "test"):
        assert torch.equal(record[f"{split}_images"][:, 0, 0, 0].long(), record[f"{split}_labels"])
    # Pixels as written, through PNG and back.
    first = np.array(Image.open(root / "test" / "cat" / "0.png"))
    assert torch.equal(record["test_images"][0, 0], torch.from_numpy(first))


def test_an_image_folder_with_val_colour_and_resizing(tmp_path):
    root = image_folder(tmp_path / "pets", mode="RGB", size=(12, 9), val=2)
    gray = np.full((9, 12), 1, np.uint8)  # one grayscale image among colour ones: it becomes RGB
    Image.fromarray(gray, "L").save(root / "train" / "dog" / "gray.png")
    out = tmp_path / "pets.pt"
    prepare(out, "pets", dict(kind="imagefolder", path=str(root), image_size=16))
    record = torch.load(out, weights_only=True)
    assert record["train_images"].shape == (21, 3, 16, 16)  # every training image: val/ is the val split
    assert record["val_images"].shape == (4, 3, 16, 16) and record["test_images"].shape == (6, 3, 16, 16)
    resized = np.array(Image.open(root / "test" / "dog" / "2.png").convert("RGB").resize((16, 16), Image.BILINEAR))
    assert torch.equal(record["test_images"][-1], torch.from_numpy(resized).permute(2, 0, 1))


def _corrupt(root):
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def _truncated(root):
    path = root / "test" / "cat" / "2.png"
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("damage, message", [
    (lambda root: None, None),  # the folder as made: prepares
    (lambda root: __import__("shutil").rmtree(root / "test"), r"pets/test not found"),
    (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()], r"class folder .*pets/train/dog holds no images"),
    (lambda root: (root / "test" / "bird").mkdir() or image_folder(root, ("bird",), (0, 1)),
     r"pets/test and .*pets/train hold different class folders \(not in both: bird\)"),
    (_corrupt, r"cannot read image .*pets/train/dog/1.png"),
    (_truncated, r"cannot read image .*pets/test/cat/2.png"),
    (lambda root: Image.new("L", (11, 10)).save(root / "train" / "cat" / "wide.png"),
     r"image .*pets/train/cat/wide.png is 11x10, .* is 10x10; set image_size"),
])
def test_a_broken_image_folder_is_named_in_one_line_and_leaves_no_cache(tmp_path, damage, message):
    root = image_folder(tmp_path / "pets")
    damage(root)
    out = tmp_path / "data" / "pets.pt"
    if message is None:
        prepare(out, "pets", dict(kind="imagefolder", path=str(root)))
        assert out.exists()
        return
    with pytest.raises(DataError, match=message) as error:
        prepare(out, "pets", dict(kind="imagefolder", path=str(root)))
    assert "\n" not in str(error.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_streamed_image_folder_is_checked_described_and_read_through_workers(tmp_path):
    from feedback_alignment.imagenet import StreamedLoaders

    root = image_folder(tmp_path / "pets", per_class=(10, 3), val=2, mode="RGB")
    out = tmp_path / "pets.json"
    prepare(out, "pets", dict(kind="imagefolder", path=str(root), stream=True, image_size=12))
    manifest = json.loads(out.read_text())
    assert (manifest["kind"], manifest["name"], manifest["num_classes"], manifest["train_images"]) == (
        "imagefolder", "pets", 2, 20)
    assert manifest["train"] == str((root / "train").resolve()) and manifest["test"] == str((root / "test").resolve())
    assert manifest["val"] == str((root / "val").resolve()) and manifest["image_size"] == 12
    assert manifest["val_size"] is None  # val/ selects
    # Mean and std of the training images as the loaders read them (RGB, resized), by hand.
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB").resize((12, 12), Image.BILINEAR)).reshape(-1, 3)
                             for p in sorted((root / "train").rglob("*.png"))]) / 255
    np.testing.assert_allclose(manifest["mean"], pixels.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(manifest["std"], pixels.std(0), rtol=0, atol=1e-12)
    config = dict(data=str(out), crop=None, workers=0, threads=1, batch_size=4, max_batches=None, seed=0)
    loaders = StreamedLoaders(config, torch.device("cpu"))
    assert (loaders.kind, loaders.num_classes, loaders.image_size, loaders.in_channels) == ("imagefolder", 2, 12, 3)
    assert len(loaders.train_set) == 20 and len(loaders.eval_sets["val"]) == 4  # val/ selects; all of train trains
    images, labels = next(iter(loaders.train(0)))
    assert images.shape == (4, 3, 12, 12) and set(labels.tolist()) <= {0, 1}
    assert sum(len(labels) for _, labels in loaders.eval("test")) == 6


def test_a_streamed_folder_without_val_holds_out_and_a_broken_image_stops_the_prepare_step(tmp_path):
    from feedback_alignment.imagenet import StreamedLoaders

    root = image_folder(tmp_path / "pets", per_class=(10, 3))
    out = tmp_path / "pets.json"
    prepare(out, "pets", dict(kind="imagefolder", path=str(root), stream=True, val_size=5))
    loaders = StreamedLoaders(dict(data=str(out), crop=8, workers=0, threads=1, batch_size=4, max_batches=None,
                                   seed=0), torch.device("cpu"))
    assert len(loaders.train_set) == 15 and len(loaders.eval_sets["val"]) == 5
    prepare(out, "pets", dict(kind="imagefolder", path=str(root), stream=True))
    assert json.loads(out.read_text())["val_size"] == 2  # a tenth of the 20 training images
    for too_many in (20, 25):
        with pytest.raises(DataError, match=f"pets: val_size {too_many} must be between 0 and the 20 training images"):
            prepare(out, "pets", dict(kind="imagefolder", path=str(root), stream=True, val_size=too_many))
    # A test image cut short: its header opens; only the check of every image sees the rest is
    # missing (the mean and std decode training images).
    cut = root / "test" / "cat" / "1.png"
    cut.write_bytes(cut.read_bytes()[:60])
    out.unlink()
    with pytest.raises(DataError, match=r"cannot read image .*pets/test/cat/1.png"):
        prepare(out, "pets", dict(kind="imagefolder", path=str(root), stream=True))
    assert not out.exists()


def test_kinds_and_options_are_checked_by_name(tmp_path):
    with pytest.raises(DataError, match="dataset 'mine': 'mine' is not a kind and sets no kind; choose from digits"):
        prepare(tmp_path / "m.pt", "mine", {})
    with pytest.raises(DataError, match="dataset 'mine': unknown kind 'mnits'"):
        prepare(tmp_path / "m.pt", "mine", dict(kind="mnits"))
    with pytest.raises(DataError, match="dataset 'mnist' \\(kind mnist\\) has no option 'url'; its options: mirror"):
        prepare(tmp_path / "m.pt", "mnist", dict(url="http://127.0.0.1:1/x"))
    with pytest.raises(DataError, match="dataset 'pets' \\(kind imagefolder\\) needs 'path'"):
        prepare(tmp_path / "m.pt", "pets", dict(kind="imagefolder"))
    with pytest.raises(DataError, match="path '.*nowhere' does not exist"):
        prepare(tmp_path / "m.pt", "pets", dict(kind="imagefolder", path=str(tmp_path / "nowhere")))
    assert set(KINDS) == {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "imagefolder", "imagenet"}


def test_published_numbers_are_matched_by_kind_and_model_not_by_the_studys_names(tmp_path):
    from feedback_alignment.summarize import load_runs, references, summarize, versus_reference

    for seed, error in ((0, 15.0), (1, 17.0)):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "evaluation.json").write_text(json.dumps(dict(
            status="completed", best_epoch=3, test_error_top1=error, dataset_kind="cifar10",
            config=dict(dataset="c10", arch="lenet_cifar", arch_label="small", rule="usf", variant="init",
                        seed=seed))))
    runs, _, _ = load_runs([tmp_path])
    compared = versus_reference(summarize(runs), references())
    assert len(compared) == 1
    row = compared.iloc[0]
    assert (row.dataset, row.arch, row.rule) == ("c10", "small", "usf")  # the study's names, shown
    assert row.reference_error == 16.22  # BioTorch's CIFAR-10 LeNet usf, by hand from their table
    assert row.difference == pytest.approx(16.0 - 16.22)


def test_the_md5_option_takes_one_checksum_or_one_per_file():
    from feedback_alignment.sources import _md5_option

    assert _md5_option(["0" * 32]) == "0" * 32
    assert _md5_option(["a.gz=" + "1" * 32]) == {"a.gz": "1" * 32}
    assert _md5_option(["a.gz=1", "b.gz=2"]) == {"a.gz": "1", "b.gz": "2"}
    with pytest.raises(DataError, match="--md5 'b.gz': give one checksum, or FILE=MD5 for each file"):
        _md5_option(["a.gz=1", "b.gz"])
    with pytest.raises(SystemExit, match="prepare: --val-size 'many': not a valid value"):
        prepare_cli.main(["--name", "digits", "--out", "x.pt", "--val-size", "many"])


def test_torchvisions_addresses_and_checksums_stay_for_what_the_config_does_not_set(tmp_path, loopback_server):
    import torchvision.datasets as tv

    from feedback_alignment.torchvision_sets import TORCHVISION

    mnist = TORCHVISION["mnist"].with_sources(None, None)
    assert mnist.__name__ == "MNIST" and mnist.mirrors == tv.MNIST.mirrors[:1] and mnist.resources == tv.MNIST.resources
    svhn = TORCHVISION["svhn"].with_sources(None, {"test_32x32.mat": "2" * 32})
    assert svhn.split_list["train"] == tv.SVHN.split_list["train"]
    assert svhn.split_list["test"] == [tv.SVHN.split_list["test"][0], "test_32x32.mat", "2" * 32]
    # A mirror's files with md5s given for three of MNIST's four: the fourth keeps torchvision's.
    served, base = loopback_server
    md5 = serve_mnist(served)
    del md5["train-labels-idx1-ubyte.gz"]
    with pytest.raises(DataError, match=f"md5 of {base}/train-labels-idx1-ubyte.gz is .*, expected "
                                        f"{dict(tv.MNIST.resources)['train-labels-idx1-ubyte.gz']}"):
        prepare(tmp_path / "m.pt", "mnist", dict(mirror=f"{base}/", md5=md5))
    # CIFAR's unpacked batches too: the archive's md5 given, the batches' left to torchvision.
    archive_md5 = cifar_archive(served, "cifar10")["cifar-10-python.tar.gz"]
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1 unpacked with md5 \w+, expected "
                                        + tv.CIFAR10.train_list[0][1]):
        prepare(tmp_path / "c.pt", "cifar10", dict(url=f"{base}/cifar-10-python.tar.gz", md5=archive_md5))


def test_an_image_folder_of_oblong_images_needs_image_size(tmp_path):
    root = image_folder(tmp_path / "pets", size=(12, 9))
    with pytest.raises(DataError, match=r"images are 12x9, not square \(.*pets/train/cat/0.png\); set image_size"):
        prepare(tmp_path / "p.pt", "pets", dict(kind="imagefolder", path=str(root)))
    prepare(tmp_path / "p.pt", "pets", dict(kind="imagefolder", path=str(root), image_size=9, val_size=1))
    with pytest.raises(DataError, match="pets: val_size 20 must be between 0 and the 20 training images"):
        prepare(tmp_path / "p.pt", "pets", dict(kind="imagefolder", path=str(root), image_size=9, val_size=20))


def test_resizing_and_the_channel_statistics_over_more_images_than_one_chunk():
    import torchvision.transforms.functional as TF

    from feedback_alignment.data import channel_stats, resize

    rng = np.random.RandomState(4)
    images = rng.randint(0, 256, (4100, 2, 3, 5), dtype=np.uint8)  # oblong: rows and columns differ
    mean, std = channel_stats(images)
    as_float = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, as_float.mean((0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, as_float.std((0, 2, 3)), rtol=0, atol=1e-9)
    # torchvision's own resize (bilinear, antialiased), rounded to the uint8 grid
    resized = resize(images, 4)
    expected = TF.resize(torch.from_numpy(images).float(), [4, 4], antialias=True).round().clamp(0, 255).to(torch.uint8)
    assert resized.dtype == np.uint8 and torch.equal(torch.from_numpy(resized), expected)
