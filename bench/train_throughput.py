"""Training throughput, three ways, in one run (images/s; ratios are what matter on a shared machine).

(1) bare ResNet-32 forward+backward+SGD on synthetic tensors (the ceiling; same AMP/channels_last as (2)),
(2) the full MBIB training step of mbib's engine on real long-tailed batches with batched tensor augmentation,
(3) a naive torchvision DataLoader + PIL transform pipeline feeding the same MBIB model and loss,
and (2) once more without the per-step NaN check, to price its host synchronisation.
Rounds alternate (1), (2), (3) so background load hits all three alike. Results go to a JSON file.

    python bench/train_throughput.py [--steps 20] [--rounds 3] [--batch-size 128] [--out bench/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mbib.config import TrainConfig, apply_overrides
from mbib.models import build_model
from mbib.train.engine import Batch, Engine, load_data


def pick_dataset(data_root: str | None) -> str:
    """CIFAR-100-LT where present, else MNIST-LT (padded to 32x32x3 by the loader)."""
    root = Path(data_root or os.environ.get("MBIB_DATA_ROOT", ""))
    if (root / "cifar-100-python").is_dir() or (root / "cifar100.npz").is_file():
        return "cifar100-lt"
    return "mnist-lt"


class PILImages(Dataset):
    """The naive pipeline: uint8 tensors -> PIL images -> per-image torchvision transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std):
        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
        self.y = y
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.tf(self.images[i]), self.y[i]


def endless(make_epoch):
    """Batches from epoch after epoch, so a timed round never stops at an epoch's end."""
    while True:
        yield from make_epoch()


def sync() -> None:
    if torch.cuda.is_available():  # CUDA runs asynchronously: time only finished work
        torch.cuda.synchronize()


def time_steps(step, steps: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


def machine() -> dict:
    """Where a measurement ran, for the result file."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}


def write_result(result: dict, out: str) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-root", default=None)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--out", default="bench/results/train_throughput.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = pick_dataset(args.data_root)
    cfg = apply_overrides(TrainConfig(), {"data.dataset": dataset, "data.data_root": args.data_root,
                                          "optim.batch_size": args.batch_size, "optim.warmup_epochs": 0})
    engine = Engine(cfg, load_data(cfg), device)
    data = engine.data
    k = len(engine.classes)

    opts = engine.opts  # the bare model gets the device options the engine uses
    layout = torch.channels_last if opts.channels_last else torch.contiguous_format
    bare = build_model("resnet32", k, head="plain").to(device, memory_format=layout)
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9)
    xs = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=layout)
    ys = torch.randint(0, k, (args.batch_size,), device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=opts.grad_scaler)

    def bare_step():
        with torch.autocast(device.type, dtype=opts.amp_dtype, enabled=opts.amp_dtype is not None):
            logits = bare(xs)["v3"]
        loss = torch.nn.functional.cross_entropy(logits.float(), ys)
        bare_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(bare_opt)
        scaler.update()

    full_batches = endless(lambda: engine.epoch_batches(0))

    def full_step():
        engine.train_step(next(full_batches))

    def unchecked_step():  # (2) without the per-step NaN check, whose host sync stops the CPU running ahead
        engine.all_finite = lambda loss: True
        try:
            engine.train_step(next(full_batches))
        finally:
            del engine.all_finite

    naive_loader = DataLoader(PILImages(data.x_train, data.y_train, data.mean, data.std), batch_size=args.batch_size,
                              shuffle=True, num_workers=args.loader_workers, drop_last=True,
                              persistent_workers=args.loader_workers > 0, pin_memory=device.type == "cuda")
    naive_batches = endless(lambda: naive_loader)

    def naive_step():  # the engine's step, fed by the PIL loader instead of tensor batches
        x, y = next(naive_batches)
        x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
        engine.train_step(Batch(x, y.to(device, non_blocking=True), torch.zeros_like(y, device=device)))

    steps = {"bare": bare_step, "full": full_step, "unchecked": unchecked_step, "naive": naive_step}
    for fn in steps.values():  # warm-up: allocator, loader workers, kernels
        time_steps(fn, 2)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, fn in steps.items():
            rates[name].append(args.steps * args.batch_size / time_steps(fn, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.0f} img/s" for n, v in rates.items()))
    med = {n: statistics.median(v) for n, v in rates.items()}
    result = {
        "images_per_s": {"bare_resnet32": med["bare"], "mbib_full_step": med["full"],
                         "mbib_full_step_without_nan_check": med["unchecked"], "naive_pil_loader": med["naive"]},
        "ratio_unchecked_over_full": med["unchecked"] / med["full"],
        "ratio_full_over_bare": med["full"] / med["bare"],
        "ratio_full_over_naive": med["full"] / med["naive"],
        "per_round": rates,
        "dataset": dataset, "batch_size": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
        "device": str(device), "amp_dtype": str(opts.amp_dtype), "channels_last": opts.channels_last,
        "loader_workers": args.loader_workers, **machine(),
    }
    print(f"(2)/(1) = {result['ratio_full_over_bare']:.3f}   (2)/(3) = {result['ratio_full_over_naive']:.3f}")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
