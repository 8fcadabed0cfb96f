"""The short markdown of bench/gpu_fast.sh's JSON: the four modes, the shared GPU, the 200-epoch cell.

    python bench/fast_report.py RESULT.json RESULT.md [--mps on]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rate(row: dict, key: str = "images_per_s") -> str:
    return f"{row[key]:,.0f}" if isinstance(row, dict) and isinstance(row.get(key), (int, float)) else "-"


def modes_table(modes: dict) -> list[str]:
    lines = ["| mode | bare img/s | bare first call s | MBIB img/s | MBIB first epoch +s | MBIB eval s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    bare, mbib = modes.get("bare", {}), modes.get("mbib", {})
    for name in ("eager", "graphed", "compiled", "both"):
        b, m = bare.get(name, {}), mbib.get(name, {})
        lines.append(f"| {name} | {rate(b)} | {b.get('first_s', float('nan')):.1f} | {rate(m)} | "
                     f"{m.get('first_epoch_extra_s', float('nan')):.1f} | {m.get('eval_s', float('nan')):.2f} |")
    variants = {k[len("graphed_"):]: v for k, v in bare.items() if k.startswith("graphed_")}
    if variants:
        lines += ["", "Bare step graphed in other layouts and precisions (img/s): "
                  + ", ".join(f"{k} {rate(v)}" for k, v in variants.items())]
    return lines


def shared_table(shared: dict) -> list[str]:
    lines = ["| processes | total img/s | per process img/s | finished | GPU memory a process (GB) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for n, row in shared.items():
        if "skipped" in row:
            lines.append(f"| {n} | skipped ({row['skipped']}) | | | |")
            continue
        mem = max((p.get("memory_reserved_gb") or 0 for p in row["processes"] if "memory_reserved_gb" in p), default=0)
        lines.append(f"| {n} | {rate(row, 'total_images_per_s')} | {rate(row, 'per_process_images_per_s')} | "
                     f"{row['finished']}/{n} | {mem:.2f} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("md")
    p.add_argument("--mps", default="unknown")
    args = p.parse_args(argv)
    r = json.loads(Path(args.json).read_text())
    dev = r.get("device", {})
    lines = [f"# The fast training path on {dev.get('name', 'the GPU')} (bench/gpu_fast.sh)", "",
             f"torch {dev.get('torch')}, CUDA {dev.get('cuda')}, MPS {args.mps}. Raw numbers: `{Path(args.json).name}`.",
             "", "## Tests on the device", "", f"`{(r.get('fast_tests') or {}).get('summary')}`", ""]
    cell = r.get("cell", {})
    lines += ["## One 200-epoch MBIB IF-100 cell (seed 0, fast path, plain runner: evaluation every 5 epochs, checkpoints)",
              "", f"```\n{json.dumps(cell, indent=1)[:1500]}\n```", "",
              f"Reference accuracy of the same cell: {cell.get('reference_acc')} (H200 per-batch path, CPU).", ""]
    if "bare" in r.get("modes", {}):
        lines += ["## Images/s, batch 128, bf16 + channels_last", "", *modes_table(r["modes"]), ""]
    if isinstance(r.get("shared"), dict) and "error" not in r["shared"]:
        lines += ["## Processes sharing the GPU (MBIB, fast path)", "", *shared_table(r["shared"]), ""]
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["## Errors", "", *(f"- {k}: {v}" for k, v in errors.items()), ""]
    Path(args.md).write_text("\n".join(lines))
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
