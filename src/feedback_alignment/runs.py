"""What training and evaluation share about a run: its device and precision, its converted
model, its batches, and the evaluation loop. train.py trains with them; evaluate.py measures a
finished run's best weights with the same parts, from the run's recorded config."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import data as datasets
from .convert import convert
from .distributed import World, check_device_usable
from .models import build_model


def resolve_device(name: str) -> torch.device:
    """auto: CUDA where it is usable, else the CPU; a device named outright must be usable (one
    line saying why not, never a quiet fall back to the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_usable(name)
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 autocast on a GPU, fp32 on a CPU (where bf16 convolutions are slow)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def autocast(precision: str, device: torch.device):
    """The context a forward runs in at this precision."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_run_model(config: dict, num_classes: int, in_channels: int, image_size: int):
    """The converted model of a run, initialized from the run's seed (shared with evaluate)."""
    torch.manual_seed(config["seed"])
    model = build_model(config["arch"], num_classes, in_channels, image_size,
                        config["batch_norm"], config["depth"], config["width"])
    return convert(model, rule=config["rule"], scale=config["scale"], seed=config["seed"],
                   exclude=tuple(config["exclude"]), constrain_weight_norm=config["constrain_weight_norm"],
                   **config.get("rule_options", {}))


def reported_topk(num_classes: int) -> tuple[int, ...]:
    """Top-1 always; top-5 too where there are more than 10 classes (ImageNet, where published
    results report both)."""
    return (1, 5) if num_classes > 10 else (1,)


def accuracy_counts(logits, labels, topk=(1,)):
    """Number of correct predictions within the top k, for each k."""
    top = logits.topk(max(topk), dim=1).indices
    hits = top.eq(labels[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in topk]


@torch.no_grad()
def evaluate(model, loader, topk=(1,), world: World = World(), device=None, precision="fp32"):
    """Top-k error (%) and mean loss of `model` over `loader` (this rank's share of it; the
    counts are summed over ranks)."""
    model.eval()
    correct, total, loss_sum = [0] * len(topk), 0, 0.0
    for images, labels in loader:
        with autocast(precision, images.device):
            logits = model(images)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct = [c + n for c, n in zip(correct, accuracy_counts(logits, labels, topk))]
        total += labels.shape[0]
    *correct, total, loss_sum = world.sum([*correct, total, loss_sum], device)
    return [100.0 * (1 - c / total) for c in correct], loss_sum / total


class Loaders:
    """Training and evaluation batches of a cached dataset (every kind but imagenet), on the device."""

    def __init__(self, config: dict, device, world: World = World()):
        self.data = datasets.load_tensor_data(config["data"], device)
        self.config, self.device, self.world = config, device, world
        self.num_classes = self.data.num_classes
        self.kind = self.data.kind
        self.in_channels = self.data.in_channels
        self.image_size = config["crop"] or self.data.image_size
        if self.image_size > self.data.image_size + 2 * config["pad"]:
            raise datasets.DataError(f"--crop {config['crop']} is larger than the padded {config['dataset']} images")

    def train(self, epoch, state=None):
        generator = torch.Generator(device=self.device).manual_seed(datasets.epoch_seed(self.config["seed"], epoch))
        return datasets.EpochBatches(self.data, self.config["batch_size"], generator, self.image_size,
                                     self.config["pad"], self.config["flip"], self.config["max_batches"], state,
                                     share=self.world.share(self.config["batch_size"]))

    def eval(self, split):
        return datasets.batches(self.data, split, self.config["batch_size"] * 2, self.image_size,
                                self.config["max_batches"], rank=self.world.rank, world_size=self.world.size)

    def train_batches_per_epoch(self):
        n = self.data.splits["train"][1].shape[0] // self.config["batch_size"]
        return min(n, self.config["max_batches"] or n)

    def probe_batch(self, size):
        """A fixed batch (the first validation images) for the alignment measurements."""
        return next(datasets.batches(self.data, "val", size, self.image_size))


def make_loaders(config: dict, device, world: World = World()):
    """The run's batches, from its resolved config (dataset, data, batch_size, crop, pad, flip,
    seed, max_batches; imagenet also workers and threads): a cache (.pt) is served on the device,
    a manifest (.json) streams through DataLoader workers."""
    if not str(config["data"]).endswith(".json"):
        return Loaders(config, device, world)
    from .imagenet import StreamedLoaders
    return StreamedLoaders(config, device, world)
