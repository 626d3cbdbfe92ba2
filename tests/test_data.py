"""The tensor cache and its batches: digits, augmentation, exact resume (downloads: test_sources.py)."""
import torch

from feedback_alignment import data


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
