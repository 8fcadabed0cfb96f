"""Augmentation throughput in one run (images/s; the ratios are what matter on a shared machine).

(1) the standard crop + flip (cifar_augment), (2) the strong preset (crop, flip, batched per-image
AutoAugment, Cutout), (3) torchvision's v2.AutoAugment called once per image (a per-image policy the
plain way), each on the same uint8 batch. Rounds alternate so background load hits all alike.

    python bench/augment_throughput.py [--batch-size 128] [--rounds 5] [--out bench/results/augment_throughput.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torchvision.transforms import v2
from train_throughput import machine, time_steps, write_result

from mbib.data.augment import cifar_augment
from mbib.data.autoaugment import auto_augment
from mbib.data.strong_augment import strong_augment


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="bench/results/augment_throughput.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    reference = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    pipelines = {
        "standard": lambda: cifar_augment(x, mean, std, generator=g),
        "strong": lambda: strong_augment(x, mean, std, generator=g),
        "autoaugment_batched": lambda: auto_augment(x, g),
        "autoaugment_torchvision_per_image": lambda: torch.stack([reference(img) for img in x]),
    }
    rates: dict[str, list[float]] = {k: [] for k in pipelines}
    for fn in pipelines.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            rates[name].append(args.steps * args.batch_size / time_steps(fn, args.steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"images_per_s": med,
              "ratio_batched_over_per_image_autoaugment": med["autoaugment_batched"] / med["autoaugment_torchvision_per_image"],
              "ratio_strong_over_standard": med["strong"] / med["standard"], "per_round": rates,
              "batch_size": args.batch_size, "device": str(device), **machine()}
    for k, v in med.items():
        print(f"{k:36s} {v:10.0f} img/s")
    print(f"batched / per-image AutoAugment = {result['ratio_batched_over_per_image_autoaugment']:.2f}")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
