"""The per-step refresh of a model alone, caches flushed before each call as a training step
leaves them; prints min and median ms over 25 calls. Run old and new code alternately, in
separate processes, to compare them (PYTHONPATH=<other checkout>/src for the other):

    python scripts/refresh_time.py resnet18 brsf
"""
import statistics
import sys
import time

import torch

import feedback_alignment as fa
from feedback_alignment.layers import refresh_ahead_of_forward
from feedback_alignment.models import build_model

arch, rule = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = fa.convert(build_model(arch, 10, 3, 32), rule=rule, scale="match", seed=0)
for _ in range(3):
    refresh_ahead_of_forward(model, ())
flush = torch.empty(64 << 20, dtype=torch.uint8)
times = []
for _ in range(25):
    flush.add_(1)
    start = time.perf_counter()
    refresh_ahead_of_forward(model, ())
    times.append(time.perf_counter() - start)
print(f"{arch} {rule}: min {1e3 * min(times):.2f} ms, median {1e3 * statistics.median(times):.2f} ms")
