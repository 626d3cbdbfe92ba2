"""The architectures of the study, by name: `build_model(arch, num_classes, in_channels, ...)`.

- convnet   : plain 3x3 conv stack (depth and width configurable), the embedded digits study
- arch1     : the CIFAR-10 "Arch 1" of the paper (TensorFlow CIFAR-10 tutorial network)
- lenet_mnist, lenet_cifar : the LeNet baselines of BioTorch (Sanfiz & Akrout 2021), whose
                            published errors on MNIST, Fashion-MNIST and CIFAR-10 we compare with
- resnet20/32/44/56/110 : CIFAR ResNets of He et al. 2016 (3 stages, option-A shortcuts)
- any torchvision classification model by its name (resnet18, resnet50, vgg11_bn, mobilenet_v2, ...)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class ConvNet(nn.Module):
    """`depth` conv3x3-(BN)-ReLU layers of `width` channels, global average pool, linear classifier.
    Deep and narrow on purpose: the error signal crosses many feedback matrices, which is where
    badly scaled feedback explodes or vanishes."""

    def __init__(self, num_classes: int, in_channels: int = 1, depth: int = 8, width: int = 32,
                 batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm),
                       _norm(width, batch_norm), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He init keeps plain (no-BN) stacks trainable by bp
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Arch1(nn.Module):
    """conv5x5-64, ReLU, maxpool 2, conv5x5-64, ReLU, maxpool 2, FC 384, FC 192, FC classes,
    for 24x24 crops (any input size works: the first FC layer is sized lazily from a dummy pass)."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 24,
                 batch_norm: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2), _norm(64, batch_norm), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 5, padding=2), _norm(64, batch_norm), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat = 64 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Linear(flat, 384), nn.ReLU(inplace=True),
            nn.Linear(384, 192), nn.ReLU(inplace=True),
            nn.Linear(192, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet(nn.Module):
    """LeNet-5's layout as the peer BioTorch published it: conv5x5-ReLU-maxpool 2 twice, conv5x5-ReLU,
    then two fully connected layers with no nonlinearity between them (theirs has none; kept, so
    that its published numbers compare). `channels` are the three convs' widths: (6, 16, 120) for
    MNIST, (32, 64, 128) for CIFAR. Images of side 32 or more (MNIST resized to 32, as theirs)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, channels: tuple[int, int, int],
                 batch_norm: bool = False):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2 - 4  # the third conv's output side
        if side < 1:
            raise ValueError(f"lenet needs images of side 32 or more, got {image_size} "
                             "(set the dataset's image_size: 32, as BioTorch resizes MNIST)")
        first, second, third = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, 5), _norm(first, batch_norm), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 5), _norm(second, batch_norm), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(second, third, 5), _norm(third, batch_norm), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Linear(third * side * side, 84), nn.Linear(84, num_classes))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):  # their configs set init: xavier
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


LENET_CHANNELS = {"lenet_mnist": (6, 16, 120), "lenet_cifar": (32, 64, 128)}


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=not batch_norm)
        self.bn1 = _norm(planes, batch_norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=not batch_norm)
        self.bn2 = _norm(planes, batch_norm)
        # Option A (He et al. 2016, CIFAR): subsample and zero-pad channels, no parameters,
        # so every learned layer of the net is a conv that the rule converts.
        self.pad_channels = planes - in_planes
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad_channels:
            shortcut = x[:, :, ::self.stride, ::self.stride]
            half = self.pad_channels // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.pad_channels - half))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, batch_norm: bool = True):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=not batch_norm)
        self.bn1 = _norm(16, batch_norm)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(blocks):
                stages.append(_BasicBlock(in_planes, planes, stride if index == 0 else 1, batch_norm))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


CIFAR_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


class ShapesOnly(torch.overrides.TorchFunctionMode):
    """Builds models for their modules and shapes only (a study's config check): on the meta
    device, with torch.nn.init's random fills skipped. On meta tensors those fills are Python
    decompositions whose first use imports torch's compiler stack, 1.5 s of every Snakemake
    start; the values of meta tensors mean nothing anyway."""

    RANDOM_FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.erfinv_,
                              torch.Tensor.exponential_, torch.Tensor.bernoulli_})

    def __enter__(self):
        self.device = torch.device("meta")
        self.device.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.device.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RANDOM_FILLS:
            return args[0]
        return func(*args, **(kwargs or {}))


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                batch_norm: bool = True, depth: int = 8, width: int = 32) -> nn.Module:
    if arch == "convnet":
        return ConvNet(num_classes, in_channels, depth, width, batch_norm)
    if arch == "arch1":
        return Arch1(num_classes, in_channels, image_size, batch_norm)
    if arch in LENET_CHANNELS:
        return LeNet(num_classes, in_channels, image_size, LENET_CHANNELS[arch], batch_norm)
    if arch in CIFAR_RESNET_DEPTHS:
        return CifarResNet(CIFAR_RESNET_DEPTHS[arch], num_classes, in_channels, batch_norm)
    # Imported here: torchvision's import pulls in torch's compiler stack (about 2 s), which a
    # job training one of the models above never needs.
    import torchvision

    if arch in torchvision.models.list_models(module=torchvision.models):
        if in_channels != 3:
            raise ValueError(f"torchvision model {arch!r} needs 3 input channels, data has {in_channels}")
        if not batch_norm:
            raise ValueError(f"torchvision model {arch!r} has its own normalization; batch_norm=false "
                             "applies to convnet, arch1, lenet and the CIFAR ResNets only")
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown arch {arch!r}; choose convnet, arch1, {', '.join(LENET_CHANNELS)}, "
                     f"{', '.join(CIFAR_RESNET_DEPTHS)} or a torchvision classification model name")
