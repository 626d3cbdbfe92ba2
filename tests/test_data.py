"""The tensor cache and its batches: digits, augmentation, exact resume (downloads: test_sources.py)."""
import numpy as np
import pytest
import torch

from feedback_alignment import data


def unnormalized(num_classes: int, **splits) -> data.TensorData:
    """A dataset held in memory whose batches are the images / 255 (mean 0, std 1): what a batch
    holds shows which images it took and how they were cropped and flipped."""
    return data.TensorData("t", "t", splits, num_classes, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))


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


def test_center_crop_takes_the_middle_by_hand():
    images = torch.arange(2 * 1 * 7 * 7).view(2, 1, 7, 7)
    assert torch.equal(data.center_crop(images, 4), images[..., 1:5, 1:5])  # (7 - 4) // 2 = 1
    assert torch.equal(data.center_crop(images, 3), images[..., 2:5, 2:5])
    assert torch.equal(data.center_crop(images, 7), images)
    assert torch.equal(data.center_crop(images, 6), images[..., 0:6, 0:6])  # a margin of 1: (7 - 6) // 2 = 0
    oblong = torch.arange(6 * 8).view(1, 1, 6, 8)
    assert torch.equal(data.center_crop(oblong[..., :6], 2), oblong[..., 2:4, 2:4])


def test_evaluation_batches_cover_each_image_once_in_order_and_split_among_ranks():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    loaded = unnormalized(10, train=(images, labels), val=(images, labels))
    assert [b[1].tolist() for b in data.batches(loaded, "val", 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b[1].tolist() for b in data.batches(loaded, "val", 4, max_batches=2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    ranks = [[b[1].tolist() for b in data.batches(loaded, "val", 4, rank=r, world_size=2)] for r in (0, 1)]
    assert ranks == [[[0, 1, 2, 3], [8, 9]], [[4, 5, 6, 7]]]
    first, _ = next(data.batches(loaded, "val", 4))
    assert torch.equal(first[:, 0, 0, 0], torch.arange(4) / 255)  # (x / 255 - 0) / 1


def test_the_digits_cache_holds_sklearns_images_on_the_0_255_scale(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits.pt"
    data.prepare_digits(out)
    record = torch.load(out, weights_only=True)
    cached = torch.cat([record[f"{s}_images"] for s in ("train", "val", "test")]).flatten(1)
    labels = torch.cat([record[f"{s}_labels"] for s in ("train", "val", "test")])
    digits = load_digits()
    expected = torch.from_numpy((digits.images.reshape(len(digits.images), -1) * 255 / 16).round()).to(torch.uint8)
    # The same images with the same labels, in another order (rows sorted with their label).
    def rows(images, targets):
        return sorted(zip(images.tolist(), targets.tolist()))
    assert rows(cached, labels) == rows(expected, torch.from_numpy(digits.target))
    assert record["kind"] == "digits" and int(cached.max()) == 255
    with pytest.raises(data.DataError, match="digits has 1797 images; val_size \\+ test_size must leave some"):
        data.prepare_digits(tmp_path / "d.pt", val_size=1437)


def test_random_crops_reach_every_offset_and_flips_are_horizontal_half_the_time():
    # Each pixel holds its own position, so a crop's first pixel tells where the crop began.
    images = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(4000, 1, 1, 1)
    crops = data.augment(images, torch.Generator().manual_seed(0), crop=2, pad=0, flip=False)
    corner = crops[:, 0, 0, 0].long()
    tops, lefts = corner // 4, corner % 4
    assert set(tops.tolist()) == {0, 1, 2} and set(lefts.tolist()) == {0, 1, 2}  # room 2, both ends
    for offset in range(3):  # uniform: about a third each
        assert abs((tops == offset).float().mean().item() - 1 / 3) < 0.04
    assert torch.equal(crops[:, 0, 1, 1].long(), corner + 5)  # the crop is contiguous
    flipped = data.augment(images, torch.Generator().manual_seed(1), crop=4, pad=0, flip=True)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert bool((mirrored | kept).all()) and abs(mirrored.float().mean().item() - 0.5) < 0.04


def test_the_digits_splits_are_drawn_as_documented_and_the_record_says_what_it_holds(tmp_path):
    """Test images: the first 360 of a permutation drawn with the split seed; validation: the first
    180 of the rest's permutation drawn with the seed + 1 (so that the two draws are independent);
    train: the rest, in that order. Mean and std: of the training split only, in [0, 1]."""
    from sklearn.datasets import load_digits

    data.prepare_digits(tmp_path / "d.pt", val_size=100, test_size=200, split_seed=7, name="my-digits")
    record = torch.load(tmp_path / "d.pt", weights_only=True)
    digits = load_digits()
    images = torch.from_numpy((digits.images * 255 / 16).round()).to(torch.uint8)[:, None]
    labels = torch.from_numpy(digits.target).long()
    order = np.random.RandomState(7).permutation(1797)
    test, rest = order[:200], order[200:]
    rest_order = np.random.RandomState(8).permutation(len(rest))
    val, train = rest[rest_order[:100]], rest[rest_order[100:]]
    for split, index in (("train", train), ("val", val), ("test", test)):
        assert torch.equal(record[f"{split}_images"], images[index]), split
        assert torch.equal(record[f"{split}_labels"], labels[index]), split
        assert record[f"{split}_images"].dtype == torch.uint8 and record[f"{split}_labels"].dtype == torch.int64
    pixels = images[train].double() / 255
    assert record["mean"] == pytest.approx([pixels.mean().item()], rel=1e-12)
    assert record["std"] == pytest.approx([pixels.std(unbiased=False).item()], rel=1e-9)
    assert {key: record[key] for key in ("name", "kind", "num_classes", "source")} == dict(
        name="my-digits", kind="digits", num_classes=10, source="sklearn.datasets.load_digits")
    loaded = data.load_tensor_data(tmp_path / "d.pt", torch.device("cpu"))
    assert (loaded.name, loaded.kind, loaded.num_classes) == ("my-digits", "digits", 10)
    assert loaded.mean.shape == loaded.std.shape == (1, 1, 1, 1) and loaded.mean.item() == pytest.approx(record["mean"][0])
    assert loaded.std.item() == pytest.approx(record["std"][0])
    # A cache from before kinds were recorded: its name is its kind.
    del record["kind"]
    torch.save(record, tmp_path / "old.pt")
    assert data.load_tensor_data(tmp_path / "old.pt", torch.device("cpu")).kind == "my-digits"
    with pytest.raises(data.DataError) as missing:
        data.load_tensor_data(tmp_path / "none.pt", torch.device("cpu"))
    assert str(missing.value) == f"prepared dataset {str(tmp_path / 'none.pt')!r} not found; run the download step first"


def test_an_epoch_serves_full_batches_of_its_own_rows_up_to_max_batches():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    labels = torch.arange(10)
    loaded = unnormalized(10, train=(images, labels))

    def labels_of(epoch):
        return [batch_labels.tolist() for _, batch_labels in epoch]
    whole = data.EpochBatches(loaded, 4, torch.Generator().manual_seed(0), crop=1, pad=0, flip=False)
    served = labels_of(whole)
    assert len(whole) == 2 and [len(b) for b in served] == [4, 4]  # 10 // 4: the ragged 2 are dropped
    assert sorted(sum(served, [])) == sorted(whole.order[:8].tolist()) and len(set(sum(served, []))) == 8
    assert served == [whole.order[:4].tolist(), whole.order[4:8].tolist()]  # in the epoch's order
    capped = data.EpochBatches(loaded, 4, torch.Generator().manual_seed(0), crop=1, pad=0, flip=False, max_batches=1)
    assert len(capped) == 1 and labels_of(capped) == served[:1]
    assert len(data.EpochBatches(loaded, 4, torch.Generator(), 1, 0, False, max_batches=5)) == 2
    # Two ranks of a data-parallel run: each its half of every global batch.
    halves = [labels_of(data.EpochBatches(loaded, 4, torch.Generator().manual_seed(0), 1, 0, False,
                                          share=share)) for share in (slice(0, 2), slice(2, 4))]
    assert [a + b for a, b in zip(*halves)] == served
    assert data.epoch_seed(3, 2) == 3 * 100003 + 2 and data.epoch_seed(0, 1) != data.epoch_seed(1, 0)


def test_cache_splits_holds_out_validation_as_documented_and_records_what_it_was_given(tmp_path):
    images = np.arange(10 * 2 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2, 2)
    labels = np.arange(10)
    test_images, test_labels = images[:3] + 1, np.array([7, 8, 9])
    data.cache_splits(tmp_path / "c.pt", "mine", "somekind", images, labels, test_images, test_labels, 10,
                      val_size=4, split_seed=3, image_size=None, source="from the test")
    record = torch.load(tmp_path / "c.pt", weights_only=True)
    order = np.random.RandomState(3).permutation(10)
    assert record["val_labels"].tolist() == order[:4].tolist() and record["train_labels"].tolist() == order[4:].tolist()
    assert torch.equal(record["train_images"], torch.from_numpy(images[order[4:]]))
    assert torch.equal(record["test_images"], torch.from_numpy(test_images))
    pixels = images[order[4:]] / 255
    assert record["mean"] == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist(), rel=1e-12)
    assert record["std"] == pytest.approx(pixels.std(axis=(0, 2, 3)).tolist(), rel=1e-9)
    assert (record["name"], record["kind"], record["source"], record["num_classes"]) == (
        "mine", "somekind", "from the test", 10)
    # A validation split given (ImageNet's own): nothing is held out of train.
    data.cache_splits(tmp_path / "v.pt", "mine", "somekind", images, labels, test_images, test_labels, 10,
                      val_size=4, split_seed=3, image_size=None, source="s", val=(images[:2], labels[:2]))
    given = torch.load(tmp_path / "v.pt", weights_only=True)
    assert given["train_labels"].tolist() == list(range(10)) and given["val_labels"].tolist() == [0, 1]
    for val_size in (0, 10):
        with pytest.raises(data.DataError) as error:
            data.cache_splits(tmp_path / "x.pt", "mine", "k", images, labels, test_images, test_labels, 10,
                              val_size=val_size, split_seed=0, image_size=None, source="s")
        assert str(error.value) == f"mine: val_size {val_size} must be between 0 and the 10 training images"
    assert not (tmp_path / "x.pt").exists()


def test_resizing_no_images_gives_no_images_of_the_new_size():
    empty = data.resize(np.zeros((0, 3, 8, 8), np.uint8), 4)
    assert empty.shape == (0, 3, 4, 4) and empty.dtype == np.uint8
    white = data.resize(np.full((2, 1, 7, 7), 255, np.uint8), 3)  # a constant stays itself: no overshoot
    assert white.dtype == np.uint8 and (white == 255).all()


def test_the_default_digits_split_is_the_documented_one(tmp_path):
    # What the default study trains on: 180 validation and 360 test images, split seed 0.
    data.prepare_digits(tmp_path / "default.pt")
    data.prepare_digits(tmp_path / "explicit.pt", val_size=180, test_size=360, split_seed=0, name="digits")
    default, explicit = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("default", "explicit"))
    assert default.keys() == explicit.keys() and default["name"] == "digits"
    for key, value in default.items():
        assert torch.equal(value, explicit[key]) if isinstance(value, torch.Tensor) else value == explicit[key], key


class Payload:
    """Stands for any object a pickle could carry, and run code to build."""


def test_a_cache_loads_per_channel_statistics_and_refuses_anything_but_tensors(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (6, 3, 4, 4)).astype(np.uint8)
    data.cache_splits(tmp_path / "c.pt", "rgb", "rgb", images, np.arange(6), images[:2], np.arange(2), 6,
                      val_size=2, split_seed=0, image_size=None, source="s")
    loaded = data.load_tensor_data(tmp_path / "c.pt", torch.device("cpu"))
    record = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded.mean.shape == loaded.std.shape == (1, 3, 1, 1) and loaded.in_channels == 3
    assert loaded.mean.flatten().tolist() == pytest.approx(record["mean"]) and loaded.image_size == 4
    # A cache is data: a file that would run code when unpickled is refused, not loaded.
    record["name"] = Payload()  # an object of a class: only a full unpickler builds it
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        data.load_tensor_data(tmp_path / "bad.pt", torch.device("cpu"))


def test_a_crop_with_one_pixel_of_room_moves_and_one_without_draws_nothing():
    images = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3).repeat(200, 1, 1, 1)
    crops = data.augment(images, torch.Generator().manual_seed(0), crop=2, pad=0, flip=False)
    assert crops.shape == (200, 1, 2, 2) and set(crops[:, 0, 0, 0].tolist()) == {0, 1, 3, 4}
    # No room: no offsets drawn, so the flips are the generator's first draws.
    flipped = data.augment(images, torch.Generator().manual_seed(5), crop=3, pad=0, flip=True)
    expected = torch.rand(200, generator=torch.Generator().manual_seed(5)) < 0.5
    assert torch.equal((flipped != images).flatten(1).any(1), expected)


def test_training_batches_are_padded_cropped_and_flipped_as_asked():
    # Every pixel holds its column + 1 (0 only where padding was added); mean 0, std 1.
    images = (torch.arange(4, dtype=torch.uint8) + 1).expand(400, 1, 4, 4).contiguous()
    loaded = unnormalized(1, train=(images, torch.zeros(400, dtype=torch.long)))

    def first_batch(pad, flip):
        batch, _ = next(iter(data.EpochBatches(loaded, 400, torch.Generator().manual_seed(0), 4, pad, flip)))
        return (batch * 255).round().long()
    plain = first_batch(0, False)
    assert torch.equal(plain, images.long())
    padded = first_batch(2, False)  # 8 x 8 after padding, cropped back to 4 x 4 at a random offset
    # per axis a crop keeps on average 2.8 of its 4 pixels in the image (offsets 0-4): 1 - 0.7 ** 2 padding
    assert padded.shape == (400, 1, 4, 4) and abs((padded == 0).float().mean().item() - 0.51) < 0.04
    flipped = first_batch(0, True)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert 0.4 < mirrored.float().mean() < 0.6 and ((flipped == images).flatten(1).all(1) | mirrored).all()
