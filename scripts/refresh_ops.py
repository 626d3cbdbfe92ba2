"""Operations the per-step refresh dispatches, per model and rule (the PyTorch path, what a GPU
runs; views not counted, as no kernel runs for them):

    FEEDBACK_ALIGNMENT_NATIVE=0 python scripts/refresh_ops.py
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import feedback_alignment as fa
from feedback_alignment.layers import refresh_ahead_of_forward
from feedback_alignment.models import build_model


class Operations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


for arch in ("resnet20", "resnet18"):
    for rule in ("fa", "usf", "brsf", "frsf"):
        torch.manual_seed(0)
        model = fa.convert(build_model(arch, 10, 3, 32), rule=rule, scale="match", seed=0)
        refresh_ahead_of_forward(model, ())
        with Operations() as operations:
            refresh_ahead_of_forward(model, ())
        print(f"{arch} {rule}: {operations.count} operations, {len(fa.feedback_layers(model))} layers")
