"""B's angle to W after a number of mirror phases, with and without wm's work budget.

    python scripts/mirror_budget_angles.py --arch resnet18 --image-size 32 --batch 128 --phases 60

One training forward and backward on random images sets the positions each layer sees (what the
budget compares the mirror phase with); then W stays fixed and only the mirror phases run, so the
angle measures the estimate's noise and B's start, not W's drift. Prints each layer's angle
(degrees) under every budget, and the noise images each layer got.
"""
import argparse

import torch
import torch.nn.functional as F

import feedback_alignment as fa
from feedback_alignment.alignment import angle_degrees
from feedback_alignment.models import build_model


def angles_after_mirror_phases(arch, image_size, batch, phases, budget, channels):
    torch.manual_seed(0)
    model = fa.convert(build_model(arch, num_classes=10, in_channels=channels, image_size=image_size),
                       rule="wm", seed=0, budget=budget)
    images = torch.randn(batch, channels, image_size, image_size)
    F.cross_entropy(model(images), torch.randint(0, 10, (batch,))).backward()
    options = model.get_submodule(fa.feedback_layers(model)[0][0]).rule_options
    layers = fa.mirror.mirror_layers(model)
    noise = fa.mirror.noise_images(layers, options["batch"], budget)
    for _ in range(phases):
        fa.mirror.mirror_step(model, options["lr"], options["decay"], options["batch"], budget)
    return {name: (angle_degrees(layer.feedback_weight, layer.weight.detach()), images)
            for (name, layer), images in zip(fa.feedback_layers(model), noise)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--phases", type=int, default=60)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.2])
    args = parser.parse_args()
    results = {budget: angles_after_mirror_phases(args.arch, args.image_size, args.batch, args.phases, budget,
                                                  args.channels)
               for budget in args.budgets}
    print("layer " + " ".join(f"{f'budget {b}':>20}" for b in args.budgets))
    for name in results[args.budgets[0]]:
        cells = " ".join(f"{results[b][name][0]:9.1f} deg ({results[b][name][1]:2d} im)" for b in args.budgets)
        print(f"{name:24s} {cells}")
    for budget in args.budgets:
        values = [angle for angle, _ in results[budget].values()]
        print(f"budget {budget}: mean {sum(values) / len(values):.1f} deg, max {max(values):.1f} deg")


if __name__ == "__main__":
    main()
