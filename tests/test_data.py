"""Datasets: digits cache, the CIFAR-10 download path through a loopback HTTP server, ImageNet checks."""
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from feedback_alignment import data

PER_BATCH = 12  # images per CIFAR-10 batch file in the fake archive


def _cifar_archive(path: Path, evil_member: str | None = None) -> bytes:
    """A small archive in the real CIFAR-10 python format: 5 training batches and a test batch,
    pickled dicts with b'data' (N x 3072 uint8, channel-major) and b'labels'."""
    rng = np.random.RandomState(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for index, name in enumerate(names):
            labels = [(index * PER_BATCH + j) % 10 for j in range(PER_BATCH)]
            images = rng.randint(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
            images[:, 0] = labels  # first red pixel = label: lets the test check alignment
            payload = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": images},
                                   protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if evil_member:
            info = tarfile.TarInfo(evil_member)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture
def loopback_server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1 (an OS-chosen port)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cifar10_download_through_loopback(tmp_path, loopback_server):
    served, base = loopback_server
    archive = _cifar_archive(served / "cifar-10-python.tar.gz")
    out = tmp_path / "data" / "cifar10.pt"
    data.prepare_cifar10(out, url=f"{base}/cifar-10-python.tar.gz", md5=hashlib.md5(archive).hexdigest(),
                         val_size=10)
    record = torch.load(out, weights_only=True)
    assert record["train_images"].shape == (5 * PER_BATCH - 10, 3, 32, 32)
    assert record["val_images"].shape == (10, 3, 32, 32) and record["test_images"].shape == (PER_BATCH, 3, 32, 32)
    assert record["train_images"].dtype == torch.uint8
    for split in ("train", "val", "test"):  # image and label stayed together through the split
        assert torch.equal(record[f"{split}_images"][:, 0, 0, 0].long(), record[f"{split}_labels"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10.pt"]  # nothing left behind


def test_cifar10_md5_mismatch_leaves_nothing(tmp_path, loopback_server):
    served, base = loopback_server
    _cifar_archive(served / "cifar-10-python.tar.gz")
    out = tmp_path / "data" / "cifar10.pt"
    with pytest.raises(data.DataError, match="md5 of the file from http://127.0.0.1"):
        data.prepare_cifar10(out, url=f"{base}/cifar-10-python.tar.gz", md5="0" * 32, val_size=10)
    assert list(out.parent.iterdir()) == []


def test_cifar10_unreachable_and_escaping_archive(tmp_path, loopback_server):
    served, base = loopback_server
    out = tmp_path / "data" / "cifar10.pt"
    with pytest.raises(data.DataError, match="download from .*missing.tar.gz failed"):
        data.prepare_cifar10(out, url=f"{base}/missing.tar.gz", md5=None)
    _cifar_archive(served / "evil.tar.gz", evil_member="../escape.txt")
    with pytest.raises(data.DataError, match="would extract outside"):
        data.prepare_cifar10(out, url=f"{base}/evil.tar.gz", md5=None, val_size=10)
    assert list(out.parent.iterdir()) == [] and not (tmp_path / "data" / "escape.txt").exists()


@pytest.mark.parametrize("member, message", [
    ("/tmp/absolute.txt", "would extract outside"),
    ("cifar-10-batches-py/../../up.txt", "would extract outside"),
])
def test_archive_members_escaping_the_target_are_refused(tmp_path, loopback_server, member, message):
    served, base = loopback_server
    _cifar_archive(served / "evil.tar.gz", evil_member=member)
    out = tmp_path / "data" / "cifar10.pt"
    with pytest.raises(data.DataError, match=message):
        data.prepare_cifar10(out, url=f"{base}/evil.tar.gz", md5=None, val_size=10)
    assert list(out.parent.iterdir()) == []


def test_archive_links_and_truncation_are_refused(tmp_path, loopback_server):
    served, base = loopback_server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (served / "link.tar.gz").write_bytes(buffer.getvalue())
    out = tmp_path / "data" / "cifar10.pt"
    with pytest.raises(data.DataError, match="is a link or special file"):
        data.prepare_cifar10(out, url=f"{base}/link.tar.gz", md5=None)
    whole = _cifar_archive(served / "whole.tar.gz")
    (served / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data.DataError, match="not a readable tar.gz archive"):
        data.prepare_cifar10(out, url=f"{base}/cut.tar.gz", md5=None, val_size=10)
    assert list(out.parent.iterdir()) == []


def test_digits_cache_and_batches(tmp_path):
    out = tmp_path / "digits.pt"
    data.prepare_digits(out)
    loaded = data.load_tensor_data(out, torch.device("cpu"))
    sizes = {split: len(labels) for split, (_, labels) in loaded.splits.items()}
    assert sizes == {"train": 1797 - 180 - 360, "val": 180, "test": 360}
    assert loaded.in_channels == 1 and loaded.image_size == 8 and loaded.num_classes == 10
    epoch = data.EpochBatches(loaded, 32, torch.Generator().manual_seed(0), crop=8, pad=1, flip=True)
    images, labels = next(iter(epoch))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.5  # normalized
    assert len(epoch) == (1797 - 180 - 360) // 32


def test_normalized_training_images_have_mean_0_and_std_1_per_channel(tmp_path):
    """Through both paths a model sees: evaluation batches and unaugmented training batches."""
    out = tmp_path / "digits.pt"
    data.prepare_digits(out)
    loaded = data.load_tensor_data(out, torch.device("cpu"))
    everything = 10_000
    images, _ = next(data.batches(loaded, "train", everything))
    epoch = data.EpochBatches(loaded, len(loaded.splits["train"][1]), torch.Generator().manual_seed(0),
                              crop=8, pad=0, flip=False)
    shuffled, _ = next(iter(epoch))
    for normalized in (images, shuffled):
        per_channel = normalized.transpose(0, 1).reshape(normalized.shape[1], -1)
        torch.testing.assert_close(per_channel.mean(1), torch.zeros(1), rtol=0, atol=1e-5)
        torch.testing.assert_close(per_channel.std(1), torch.ones(1), rtol=0, atol=1e-5)


def test_epoch_resumes_exactly_mid_way(tmp_path):
    out = tmp_path / "digits.pt"
    data.prepare_digits(out)
    loaded = data.load_tensor_data(out, torch.device("cpu"))

    def epoch(state=None):
        return data.EpochBatches(loaded, 50, torch.Generator().manual_seed(3), 8, 2, True, state=state)
    straight = [images for images, _ in epoch()]
    interrupted = epoch()
    first = [images for _, (images, _) in zip(range(7), interrupted)]
    state = interrupted.state_dict()
    rest = [images for images, _ in epoch(state)]
    assert len(first) == 7 and len(first) + len(rest) == len(straight)
    for a, b in zip(first + rest, straight):
        assert torch.equal(a, b)


def test_random_crop_matches_hand_indexing():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    top, left = torch.tensor([0, 2]), torch.tensor([1, 0])
    crops = data._crop(images, top, left, 2)
    assert torch.equal(crops[0], images[0, :, 0:2, 1:3]) and torch.equal(crops[1], images[1, :, 2:4, 0:2])
