"""The fast training path on a GPU, in the sections bench/gpu_check.py runs (bench/gpu_fast.sh is the one call):

  modes   images/s of the bare ResNet-32 step and of the MBIB step (CIFAR-100-LT IF 100 where present), each
          eager / graphed / compiled / both, with the first epoch's extra seconds (capture, compile);
  shared  N = 1, 4, 8, 16 processes training MBIB on the fast path at once (under MPS when the script started
          it): per-process and total images/s over a window they all train in, and each one's GPU memory;
  cell    one whole 200-epoch MBIB IF-100 run on the plain runner, fast path, end to end with its accuracy.

    python bench/fast_throughput.py worker --ready DIR --n N --seconds T   (one process of `shared`)

FAST_BENCH_SET (JSON of config settings) shrinks the runs for a dry run of the script's logic on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mbib.config import TrainConfig, resolve_config
from mbib.methods import method_recipe
from mbib.train.engine import Engine, load_data

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import bare_step_fn, pick_dataset  # noqa: E402

# engine settings of each mode: eager = today's per-batch step; graphed = the fast step (CUDA graphs)
MODES = {"eager": (False, False), "graphed": (True, False), "compiled": (False, True), "both": (True, True)}
LAYOUTS = {"nchw_bf16": (False, torch.bfloat16), "channels_last_tf32": (True, None), "nchw_tf32": (False, None)}
CELL_ACC_SEEDS = (40.9, 40.8)  # MBIB IF-100 seed 0: the H200's and the CPU's 200-epoch runs (docs/reproduction.md)


def config(data_root: str | None, epochs: int = 200, **extra) -> TrainConfig:
    return resolve_config("cifar100-lt", {"data.dataset": pick_dataset(data_root), "data.data_root": data_root,
                                          "loss.method": "mbib", **method_recipe("mbib"),
                                          "runtime.show_progress": False, **extra,
                                          **json.loads(os.environ.get("FAST_BENCH_SET", "{}"))}, epochs=epochs)


def graph_of(step, warmup: int = 3):
    """A zero-argument step captured as one CUDA graph (warmed up on a side stream first); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def sync() -> None:
    if torch.cuda.is_available():  # time finished work only (a CPU dry run has nothing to wait for)
        torch.cuda.synchronize()


def timed(fn, *args) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return time.perf_counter() - t0, out


def prepared(step, graphed: bool):
    """The step ready to time: captured (warm-up included), or called once (a compiled step compiles here)."""
    if graphed:
        return graph_of(step)
    step()
    return step


def memory_gb() -> float | None:
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def bare_modes(device: torch.device, classes: int, batch: int, steps: int) -> dict:
    """The bare ResNet-32 (bf16, channels_last, SGD) in the four modes: images/s and first-call seconds."""
    out = {}
    for name, (graphed, compiled) in MODES.items():
        step = bare_step_fn(device, classes, batch, True, torch.bfloat16, compiled)
        first, step = timed(prepared, step, graphed)
        timed(lambda: [step() for _ in range(10)])
        seconds, _ = timed(lambda: [step() for _ in range(steps)])
        out[name] = {"images_per_s": steps * batch / seconds, "first_s": first}
        print(f"bare {name}: {out[name]['images_per_s']:.0f} img/s (first call {first:.1f} s)", flush=True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: TF32 math
    for name, (channels_last, dtype) in LAYOUTS.items():  # the graphed step in the other layouts and precisions
        step = prepared(bare_step_fn(device, classes, batch, channels_last, dtype), graphed=True)
        seconds, _ = timed(lambda: [step() for _ in range(steps)])
        out[f"graphed_{name}"] = {"images_per_s": steps * batch / seconds}
    return out


def engine_modes(device: torch.device, data_root: str | None, epochs: int, deadline: float) -> dict:
    """The MBIB engine in the four modes: epoch images/s and the first epoch's extra seconds (capture, compile)."""
    out = {}
    for name, (fast, compiled) in MODES.items():
        if time.monotonic() > deadline:
            out[name] = {"skipped": "deadline"}
            continue
        cfg = config(data_root, **{"runtime.fast_step": fast, "runtime.compile": compiled})
        t0 = time.perf_counter()
        engine = Engine(cfg, load_data(cfg), device)
        build = time.perf_counter() - t0
        first, _ = timed(engine.run_epoch, 0)
        times = [timed(engine.run_epoch, e)[0] for e in range(1, 1 + epochs)]
        images = sum(engine.data.class_counts)
        steady = sorted(times)[len(times) // 2]
        ev, _ = timed(engine.evaluate)
        out[name] = {"images_per_s": images / steady, "first_epoch_extra_s": first - steady, "build_s": build,
                     "eval_s": ev, "epoch_s": times, "max_memory_gb": memory_gb()}
        print(f"mbib {name}: {out[name]['images_per_s']:.0f} img/s, first epoch +{first - steady:.1f} s, "
              f"eval {ev:.2f} s", flush=True)
    return out


def worker(args) -> None:
    """One of N processes: warm up (capture), say ready, wait for all N, train `seconds`, print one JSON line."""
    cfg = config(args.data_root, **{"runtime.compile": False})
    engine = Engine(cfg, load_data(cfg), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for epoch in range(2):  # both batch shapes warmed up; the full one captured
        engine.run_epoch(epoch)
    ready = Path(args.ready)
    (ready / f"{args.rank}").touch()
    deadline = time.monotonic() + 180
    while len(list(ready.iterdir())) < args.n and time.monotonic() < deadline:
        time.sleep(0.05)
    images, epoch = 0, 2
    sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        engine.run_epoch(epoch)  # ends in its one host read: finished work only
        images += sum(engine.data.class_counts)
        epoch += 1
    seconds = time.perf_counter() - t0
    print(json.dumps({"images_per_s": images / seconds, "epochs": epoch - 2, "seconds": seconds,
                      "memory_reserved_gb": memory_gb()}), flush=True)


def shared(data_root: str | None, counts: list[int], seconds: float, deadline: float, tmp: Path) -> dict:
    """N fast-path trainings at once; a level is skipped when it cannot finish before the deadline."""
    out = {}
    for n in counts:
        if time.monotonic() + seconds + 60 > deadline:
            out[str(n)] = {"skipped": "deadline"}
            continue
        ready = tmp / f"ready-{n}"
        ready.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "worker", "--ready", str(ready), "--n", str(n), "--seconds", str(seconds)]
        cmd += ["--data-root", data_root] if data_root else []
        procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, text=True) for r in range(n)]
        rows = []
        for p in procs:
            try:
                text, _ = p.communicate(timeout=max(10.0, deadline - time.monotonic()))
                rows.append(json.loads(text.strip().splitlines()[-1]))
            except Exception as exc:  # noqa: BLE001 - a process that failed is reported, the others kept
                p.kill()
                rows.append({"error": f"{type(exc).__name__}: {exc}"})
        ok = [r for r in rows if "images_per_s" in r]
        out[str(n)] = {"processes": rows, "total_images_per_s": sum(r["images_per_s"] for r in ok),
                       "per_process_images_per_s": sum(r["images_per_s"] for r in ok) / max(1, len(ok)),
                       "finished": len(ok)}
        print(f"shared {n}: total {out[str(n)]['total_images_per_s']:.0f} img/s, per process "
              f"{out[str(n)]['per_process_images_per_s']:.0f} ({len(ok)}/{n} finished)", flush=True)
    return out


def cell(data_root: str | None, timeout_s: float, tmp: Path) -> dict:
    """The whole 200-epoch MBIB IF-100 seed-0 run (plain runner: evaluation every 5 epochs and checkpoints)."""
    cmd = [sys.executable, __file__, "cell-run", "--checkpoint", str(tmp / "cell.pt")]
    cmd += ["--data-root", data_root] if data_root else []
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:  # the epochs it reached, from its log lines
        return {"timed_out_after_s": timeout_s, "last_lines": (exc.stdout or b"").decode().splitlines()[-3:]}
    lines = done.stdout.decode().strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"error": done.stderr.decode()[-2000:]}
    result["wall_s_with_start"] = time.perf_counter() - t0
    result["reference_acc"] = CELL_ACC_SEEDS
    print(f"cell: {json.dumps(result)[:400]}", flush=True)
    return result


def cell_run(args) -> None:
    from mbib.train.plain import run_plain

    t0 = time.perf_counter()
    cfg = config(args.data_root, **{"runtime.compile": False})
    outcome = run_plain(cfg, args.checkpoint, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - t0
    images = cfg.optim.epochs * sum(load_data(cfg).class_counts)
    print(json.dumps({"seconds": seconds, "images_per_s_with_eval": images / seconds,
                      **{k: outcome.metrics.get(k) for k in ("acc", "many", "medium", "few", "epoch")},
                      "dataset": cfg.data.dataset}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["worker", "cell-run"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--ready", default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--checkpoint", default="/tmp/cell.pt")
    args = p.parse_args(argv)
    worker(args) if args.what == "worker" else cell_run(args)


if __name__ == "__main__":
    main()
