"""What the GPU check measures besides tests and benchmarks (scripts/gpu_check.sh runs it):

    python scripts/gpu_probe.py OUT_DIR

- lanes: the mean of each 16-bit lane of 2^24 CUDA random words, and whether they equal the CPU's;
- wm: the angle between B and a fixed W after 200 mirror phases on the GPU;
- per rule, on ResNet-20 (batch 128, bf16): host synchronizations and kernel launches per
  training step, counted over 5 steps with the profiler and the sync debug mode;
- a synthetic CIFAR-10-sized cache (random images) for the train CLI's throughput run.
Writes OUT_DIR/probe.json.
"""
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import feedback_alignment as fa
from feedback_alignment import data, draws
from feedback_alignment.alignment import angle_degrees
from feedback_alignment.models import build_model

CUDA = torch.device("cuda")


def lanes() -> dict:
    key = draws.draw_key(draws.layer_key(0, "probe"), 0)
    words = draws.torch_words(key, 1 << 24, CUDA)
    means = (words.view(torch.uint16).to(torch.int32).view(-1, 4).double() / (1 << 16)).mean(0)
    same = torch.equal(words[:1 << 20].cpu(), draws.words(key, 1 << 20, torch.device("cpu")))
    return dict(lane_means=[round(float(m), 5) for m in means], equal_to_cpu=same)


def mirror_angle() -> dict:
    torch.manual_seed(0)
    model = fa.convert(build_model("resnet20", 10, 3, 32), rule="wm", seed=0).to(CUDA)
    for _ in range(200):
        fa.mirror.mirror_step(model)
    angles = {name: angle_degrees(layer.feedback_weight, layer.weight) for name, layer in fa.feedback_layers(model)}
    return dict(max_angle=max(angles.values()), mean_angle=sum(angles.values()) / len(angles))


def per_step_counts(rule: str, steps: int = 5) -> dict:
    torch.manual_seed(0)
    scale = "match" if fa.get_rule(rule).scalable else "none"
    model = fa.convert(build_model("resnet20", 10, 3, 32), rule=rule, scale=scale, seed=0)
    model = model.to(CUDA, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(128, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (128,), device=CUDA)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        fa.mirror.mirror_step(model)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            step()
    torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    launches = sum(event.count for event in profile.key_averages()
                   if event.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    return dict(syncs_per_step=syncs / steps, launches_per_step=launches / steps)


def synthetic_cifar10(path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    splits = {}
    for split, count in (("train", 45000), ("val", 5000), ("test", 10000)):
        splits[split] = (torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator).numpy(),
                         torch.randint(0, 10, (count,), generator=generator).numpy())
    data.write_cache(path, "cifar10", splits, 10, (0.5, 0.5, 0.5), (0.29, 0.29, 0.29), "synthetic (gpu_probe.py)")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    synthetic_cifar10(out / "synthetic_cifar10.pt")  # first: the train CLI runs need it
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, lanes=lanes(), wm=mirror_angle(),
                  steps={rule: per_step_counts(rule) for rule in fa.RULES})
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
