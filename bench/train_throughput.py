"""Training throughput in three rows, measured in one run (images/s; the ratios are what matter):

  limit       bare ResNet-32 forward + backward + SGD on synthetic tensors, in the fastest layout (NCHW or
              channels_last), precision (fp32, or bf16 autocast where the device runs it natively) and mode
              (eager or torch.compile) found here, with every core;
  product     the full MBIB training step of mbib's engine as a 200-epoch `mbib train` runs it by default (the
              engine's own device options, compile decision and thread count) on real long-tailed batches with
              batched augmentation;
  end_to_end  a real `mbib train` run on Ray Train with the product's options: training images per second of wall
              time between two epoch reports, so Ray, augmentation, evaluation (every `--eval-every` epochs) and
              checkpoints count.

Also the product step eager, and torch.compile's compile time against the time it saves in a 200-epoch run.
Targets: product >= 0.9 x limit, end_to_end >= 0.8 x product. Rounds alternate the step measurements so background
load hits them alike; the end-to-end run comes last, and one more product round after it, so that the VM's drift
(+-20% here from minute to minute) between the step rows and the end-to-end run shows in the product's rounds.
Results go to a JSON file.

    python bench/train_throughput.py [--steps 12] [--rounds 3] [--epochs 6] [--out bench/results/train_throughput.json]
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

from mbib.config import TrainConfig, apply_overrides
from mbib.data.cifar import CIFAR100
from mbib.data.datasets import cifar_source, resolve_data_root
from mbib.models import build_model
from mbib.train.engine import Engine, compiler_available, cpu_description, cpu_has_native_bf16, load_data


def pick_dataset(data_root: str | None) -> str:
    """CIFAR-100-LT where present (pickles, npz or zip), else MNIST-LT (padded to 32x32x3 by the loader)."""
    return "cifar100-lt" if cifar_source(CIFAR100, resolve_data_root(data_root)) is not None else "mnist-lt"


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
            "platform": platform.platform(), "cpu": cpu_description(), "cpu_native_bf16": cpu_has_native_bf16(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}


def write_result(result: dict, out: str) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def bare_step_fn(device: torch.device, num_classes: int, batch: int, channels_last: bool, dtype: torch.dtype | None,
                 compiled: bool = False):
    """One SGD step of the bare ResNet-32 (plain head) in the given layout, autocast dtype and mode."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = build_model("resnet32", num_classes, head="plain").to(device, memory_format=layout)
    model = torch.compile(net, dynamic=False) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)["v3"]
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def limit_candidates(device: torch.device, compile: bool) -> dict[str, tuple[bool, torch.dtype | None, bool]]:
    """Layouts, precisions and modes to try for the limit: bf16 only where the device has it natively."""
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    out = {"nchw_fp32": (False, None), "channels_last_fp32": (True, None)}
    if bf16:
        out.update(nchw_bf16=(False, torch.bfloat16), channels_last_bf16=(True, torch.bfloat16))
    modes = (False, True) if compile else (False,)
    return {name + ("_compiled" if c else ""): (cl, dt, c) for name, (cl, dt) in out.items() for c in modes}


def end_to_end(cfg: TrainConfig, epochs: int, eval_every: int, storage: str) -> dict:
    """Images/s of a real run between the first and the last epoch report (start-up excluded)."""
    import ray.train  # only here: the step rows need no Ray (GPU machines may lack it)

    from mbib.train.runner import run_training

    class EpochClock(ray.train.UserCallback):
        """Runs in the Train controller (another process, same machine): appends each report's wall-clock
        time to a file."""

        def __init__(self, path: Path):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(f"{time.time()}\n")

    run_cfg = apply_overrides(cfg, {"optim.epochs": epochs, "runtime.eval_every": eval_every,
                                    "runtime.show_progress": False, "runtime.storage_path": storage,
                                    "run_name": f"throughput-{int(time.time())}"})
    clock = Path(storage) / f"{run_cfg.run_name}.times"
    clock.parent.mkdir(parents=True, exist_ok=True)
    run_training(run_cfg, track=False, callbacks=[EpochClock(clock)])
    times = [float(t) for t in clock.read_text().split()]
    images = sum(load_data(run_cfg).class_counts)
    span = times[-1] - times[0]
    return {"images_per_s": images * (len(times) - 1) / span, "epochs_timed": len(times) - 1,
            "seconds_per_epoch": span / (len(times) - 1), "train_images_per_epoch": images,
            "eval_every": eval_every}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="steps a round: long enough to average this VM's bursts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6,
                   help="epochs of the end-to-end run (the first is not timed); 0 skips it")
    p.add_argument("--eval-every", type=int, default=5, help="the end-to-end run's evaluation interval (mbib's default)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also try torch.compile for the limit's bare steps (the product compiles as mbib decides)")
    p.add_argument("--storage", default="/tmp/mbib-throughput", help="Ray Train storage of the end-to-end run")
    p.add_argument("--out", default="bench/results/train_throughput.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)  # what one CPU worker gets from a local Ray
    dataset = pick_dataset(args.data_root)
    cfg = apply_overrides(TrainConfig(), {"data.dataset": dataset, "data.data_root": args.data_root,
                                          "optim.batch_size": args.batch_size, "optim.warmup_epochs": 0,
                                          "optim.epochs": 200})
    data = load_data(cfg)
    engine = Engine(cfg, data, device)  # a 200-epoch run: the engine decides on compile as `mbib train` would
    eager = Engine(apply_overrides(cfg, {"runtime.compile": False}), data, device)
    k = len(engine.classes)
    steps = {}
    for name, (cl, dt, c) in limit_candidates(device, args.compile and compiler_available(device)).items():
        steps[name] = bare_step_fn(device, k, args.batch_size, cl, dt, c)
    batches, eager_batches = endless(lambda: engine.epoch_batches(0)), endless(lambda: eager.epoch_batches(0))
    steps["product"] = lambda: engine.train_step(next(batches))
    steps["product_eager"] = lambda: eager.train_step(next(eager_batches))
    first_call = {name: time_steps(fn, 1) for name, fn in steps.items()}  # compiles happen in each first call
    for fn in steps.values():  # warm-up: allocator, kernels, oneDNN primitive caches
        time_steps(fn, 2)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, fn in steps.items():
            rates[name].append(args.steps * args.batch_size / time_steps(fn, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()) + " img/s")
    med = {n: statistics.median(v) for n, v in rates.items()}
    limit_name = max((n for n in med if not n.startswith("product")), key=med.get)
    e2e_cfg = apply_overrides(cfg, {"runtime.compile": engine.compiled})  # as a 200-epoch run, though it is short
    e2e = end_to_end(e2e_cfg, args.epochs, args.eval_every, args.storage) if args.epochs > 1 else {"images_per_s": None}
    if e2e["images_per_s"]:  # the product again after the run: its median then spans the end-to-end's minutes
        rates["product"].append(args.steps * args.batch_size / time_steps(steps["product"], args.steps))
        med["product"] = statistics.median(rates["product"])
    compile_s = first_call["product"] - args.batch_size / med["product"] if engine.compiled else 0.0
    result = {
        "images_per_s": {"limit": med[limit_name], "product": med["product"], "end_to_end": e2e["images_per_s"]},
        "ratio_product_over_limit": med["product"] / med[limit_name],
        "ratio_end_to_end_over_product": e2e["images_per_s"] and e2e["images_per_s"] / med["product"],
        "limit_is": limit_name, "limit_candidates": {n: v for n, v in med.items() if not n.startswith("product")},
        "compile": {"product_compiled": engine.compiled, "compile_s": compile_s,
                    "speedup_over_eager": med["product"] / med["product_eager"],
                    # seconds a 200-epoch CIFAR-100-LT IF-100 run (10,847 images an epoch) saves, compile paid
                    "saved_s_200_epochs": 200 * 10847 * (1 / med["product_eager"] - 1 / med["product"]) - compile_s},
        "product_options": {"amp_dtype": str(engine.opts.amp_dtype), "channels_last": engine.opts.channels_last,
                            "compiled": engine.compiled, "eval_batch": engine.opts.eval_batch},
        "end_to_end": e2e, "per_round": rates, "dataset": dataset, "batch_size": args.batch_size,
        "steps_per_round": args.steps, "rounds": args.rounds, "device": str(device), **machine(),
    }
    print(f"limit {med[limit_name]:.0f} img/s ({limit_name}), product {med['product']:.0f} img/s, product/limit "
          f"{result['ratio_product_over_limit']:.2f}")
    if e2e["images_per_s"]:
        print(f"end-to-end {e2e['images_per_s']:.0f} img/s ({e2e['seconds_per_epoch']:.1f} s/epoch), "
              f"end-to-end/product {result['ratio_end_to_end_over_product']:.2f}")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
