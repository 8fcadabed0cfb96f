"""The CPU training path of two checkouts in one run: does a change make the default CPU epoch slower?

Rounds alternate the two checkouts (each round a fresh process per checkout, one warm-up epoch, then timed
epochs through Engine.run_epoch with the CPU defaults), so this VM's drifting load hits both alike, and which
goes first swaps every round (old-new, new-old: with old always first, two runs gave new/old 0.94 and 0.98
for steps of identical aten ops, 1,205 each, and the swapped run 0.998); the
result is the ratio of the medians (new / old) with every round's images/s.

    python bench/cpu_ab.py --old ../main --new . [--rounds 3] [--out bench/results/cpu_ab.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(args) -> None:
    """One side of a round (runs with PYTHONPATH at a checkout): images/s of `epochs` default CPU epochs."""
    import torch

    from mbib.config import TrainConfig, apply_overrides
    from mbib.train.engine import Engine, load_data

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = apply_overrides(TrainConfig(), {"data.dataset": args.dataset, "data.data_root": args.data_root,
                                          "data.limit_train": args.images, "optim.warmup_epochs": 0,
                                          "runtime.compile": False})
    engine = Engine(cfg, load_data(cfg), torch.device("cpu"))
    engine.run_epoch(0)  # warm-up: allocator, oneDNN primitive caches
    rates = [engine.run_epoch(e)["images_per_s"] for e in range(1, 1 + args.epochs)]
    print(json.dumps({"images_per_s": statistics.median(rates), "rates": rates,
                      "fast_step": getattr(engine, "fast", None) is not None}), flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", default="compare", choices=["compare", "measure"])
    p.add_argument("--old", default="../main")
    p.add_argument("--new", default=".")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=768, help="training images an epoch (6 batches of 128)")
    p.add_argument("--dataset", default="mnist-lt")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", default="bench/results/cpu_ab.json")
    args = p.parse_args(argv)
    if args.what == "measure":
        return measure(args)
    sides = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
            path = sides[side]
            cmd = [sys.executable, __file__, "measure", "--epochs", str(args.epochs), "--images", str(args.images),
                   "--dataset", args.dataset, "--data-root", str(Path(args.data_root).resolve())]
            done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
                                  check=True, cwd=path)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            assert not row["fast_step"], "the CPU default must stay the per-batch path"
            rates[side].append(row["images_per_s"])
            print(f"round {r + 1} {side}: {row['images_per_s']:.1f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"ratio_new_over_old": med["new"] / med["old"], "median_images_per_s": med, "per_round": rates,
              "sides": sides, "dataset": args.dataset, "images_per_epoch": args.images, "epochs": args.epochs,
              "cpu_count": os.cpu_count(), "load_avg_1min_at_end": os.getloadavg()[0], "date": time.ctime()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"new/old {result['ratio_new_over_old']:.3f} ({med['new']:.1f} vs {med['old']:.1f} img/s); wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
