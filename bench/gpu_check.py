"""The GPU checks and measurements, as one short run for a lent GPU machine (results to one JSON file).

That machine has PyTorch and ONNX Runtime but no Ray or MLflow, so this drives mbib's engine directly:

1. device: versions, and what ``device_options`` picks on the real device (AMP dtype, channels_last)
2. parity: one fp32 MBIB step on the CPU and on the GPU from the same weights and batch
3. amp: the same step under AMP + channels_last (the default GPU path): loss near fp32's, finite weights
4. onnx: the exported ensemble on ONNX Runtime's CUDA execution provider against PyTorch (when it has one)
5. throughput: bench/train_throughput.py on the device (the bare ResNet-32 limit vs the full MBIB step)
6. compare: methods x seeds on MNIST-LT through the engine, same schedule for all (GML vs MBIB vs MBIB+GML)
7. fast_tests: the CUDA-only tests, and the fast step's and resident data's tests on CUDA (MBIB_TEST_DEVICE)
8. modes, cell, shared: the fast path's measurements (bench/fast_throughput.py)

    MBIB_DATA_ROOT=DIR python bench/gpu_check.py --out bench/results/gpu_check.json [--epochs 30] [--seeds 0 1]
    bash bench/gpu_fast.sh    (sections 1, 7 and 8 in one call of under 9 minutes, under MPS)

Each section's result is written as soon as it ends, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mbib.config import TrainConfig, resolve_config
from mbib.methods import method_recipe
from mbib.train.engine import Batch, Engine, device_options, load_data

COMPARE = {  # label -> (method, extra overrides): the GML comparison plus the check of mbib-gml's beta warm-up
    "ce": ("ce", {}),
    "bsce": ("bsce", {}),
    "mbib": ("mbib", {}),
    "gml": ("gml", {}),
    "mbib-gml": ("mbib-gml", {}),
    "mbib-gml-1view": ("mbib-gml", {"loss.gml_views": 1}),
    "mbib-gml-no-ramp": ("mbib-gml", {"loss.vsd_warmup_epochs": 0}),  # what every mbib-gml run got before the fix
}


def config(dataset: str, data_root: str | None, method: str = "mbib", epochs: int = 1, batch: int = 128,
           seed: int = 0, **extra) -> TrainConfig:
    return resolve_config("cifar100-lt", {"data.dataset": dataset, "data.data_root": data_root, "loss.method": method,
                                          "optim.batch_size": batch, "runtime.seed": seed,
                                          **method_recipe(method), **extra}, epochs=epochs)


def section_device(device: torch.device) -> dict:
    import onnxruntime as ort

    opts = device_options(device, amp=True, channels_last=True)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "amp_dtype": str(opts.amp_dtype), "channels_last": opts.channels_last, "grad_scaler": opts.grad_scaler,
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}


def _moved(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(t.to(device) for t in batch[:3]), tuple(v.to(device) for v in batch.views))


def section_parity(device: torch.device, dataset: str, data_root: str | None) -> dict:
    """fp32 on CPU vs the device (TF32 off), then AMP + channels_last on the device, from one batch."""
    out = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    cpu_cfg = config(dataset, data_root, **{"runtime.amp": False, "runtime.channels_last": False})
    data = load_data(cpu_cfg)
    cpu = Engine(cpu_cfg, data, torch.device("cpu"))
    batch = next(cpu.epoch_batches(0))
    loss_cpu, _ = cpu.train_step(batch)
    for name, amp in (("fp32", False), ("amp_channels_last", True)):
        cfg = config(dataset, data_root, **{"runtime.amp": amp, "runtime.channels_last": amp})
        eng = Engine(cfg, data, device)
        loss, terms = eng.train_step(_moved(batch, device))
        out[name] = {"loss": float(loss), "loss_cpu": float(loss_cpu),
                     "loss_rel_diff": abs(float(loss) - float(loss_cpu)) / abs(float(loss_cpu)),
                     "checksum_rel_diff": abs(eng.param_checksum() - cpu.param_checksum()) / cpu.param_checksum(),
                     "finite": bool(torch.isfinite(loss)), "terms": sorted(terms)}
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def section_onnx(device: torch.device) -> dict:
    """Exported ensemble (f+g mean) on ORT's CUDA provider vs PyTorch on the same random images."""
    import onnxruntime as ort

    from mbib.export import INPUT_NAME, OUTPUT_NAMES, EnsembleClassifier, _export_bytes
    from mbib.models import build_model

    torch.manual_seed(0)
    wrapper = EnsembleClassifier(build_model("resnet32", 100)).eval()
    images = torch.randn(16, 3, 32, 32)
    onnx_bytes, exporter = _export_bytes(wrapper, images[:2].contiguous())
    with torch.no_grad():
        ref = wrapper(images)[0].numpy()
    out = {"exporter": exporter}
    for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        if provider not in ort.get_available_providers():
            out[provider] = "not available in this onnxruntime build"
            continue
        session = ort.InferenceSession(onnx_bytes, providers=[provider])
        logits = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images.numpy()})[0]
        out[provider] = {"max_abs_diff_logits": float(abs(logits - ref).max()),
                         "providers_used": session.get_providers()}
    return out


def section_throughput(out_dir: Path, data_root: str | None) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import main as throughput

    args = ["--steps", "150", "--rounds", "3", "--epochs", "0", "--out", str(out_dir / "train_throughput_gpu.json")]
    return throughput(args + (["--data-root", data_root] if data_root else []))


def section_compare(device: torch.device, dataset: str, data_root: str | None, epochs: int, seeds: list[int],
                    labels: list[str], deadline: float, record) -> dict:
    rows = []
    for seed in seeds:
        for label in labels:
            if time.monotonic() > deadline:
                rows.append({"label": label, "seed": seed, "skipped": "deadline"})
                continue
            method, extra = COMPARE[label]
            cfg = config(dataset, data_root, method, epochs, seed=seed, **{"loss.vsd_warmup_epochs": 2, **extra})
            t0 = time.perf_counter()
            engine = Engine(cfg, load_data(cfg), device)
            for epoch in range(epochs):
                engine.run_epoch(epoch)
            result = engine.evaluate()
            rows.append({"label": label, "seed": seed, "seconds": time.perf_counter() - t0, **result.metrics()})
            print(f"compare {label} seed {seed}: acc {result.acc:.1f} many {result.many:.1f} "
                  f"medium {result.medium:.1f} few {result.few:.1f} ({rows[-1]['seconds']:.0f} s)", flush=True)
            record(rows)
    return {"dataset": dataset, "epochs": epochs, "batch_size": 128, "lr": 0.1, "vsd_warmup_epochs": 2, "runs": rows}


FAST_TESTS = ["tests/test_fast_step.py", "tests/test_resident.py", "tests/test_data.py", "tests/test_autoaugment.py"]


def section_fast_tests(timeout_s: float) -> dict:
    """pytest on the device: the CUDA-only tests and the fast path's equality tests with MBIB_TEST_DEVICE=cuda."""
    env = {**os.environ, "MBIB_TEST_DEVICE": "cuda"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TESTS,
           "-k", "cuda or fast or resident"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"pytest ran past {timeout_s:.0f} s"}
    return {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:],
            "tail": done.stdout[-3000:]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/gpu_check.json")
    p.add_argument("--dataset", default="mnist-lt")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(COMPARE), choices=list(COMPARE))
    p.add_argument("--sections", nargs="+", default=["device", "parity", "onnx", "throughput", "compare"])
    p.add_argument("--budget-s", type=float, default=420, help="start no comparison run after this many seconds")
    p.add_argument("--shared", type=int, nargs="+", default=[1, 4, 8, 16], help="processes sharing the GPU")
    p.add_argument("--shared-seconds", type=float, default=12)
    p.add_argument("--cell-timeout-s", type=float, default=170)
    args = p.parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1))

    def record_compare(rows) -> None:
        results["compare"] = {"partial": rows}
        save()

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    sys.path.insert(0, str(Path(__file__).parent))
    import fast_throughput as fast

    sections = {
        "device": lambda: section_device(device),
        "parity": lambda: section_parity(device, args.dataset, args.data_root),
        "onnx": lambda: section_onnx(device),
        "throughput": lambda: section_throughput(out_path.parent, args.data_root),
        "compare": lambda: section_compare(device, args.dataset, args.data_root, args.epochs, args.seeds,
                                           args.methods, start + args.budget_s, record_compare),
        "fast_tests": lambda: section_fast_tests(timeout_s=120),
        "modes": lambda: {"bare": fast.bare_modes(device, 100, 128, steps=200),
                          "mbib": fast.engine_modes(device, args.data_root, 3, start + args.budget_s - 100)},
        "cell": lambda: fast.cell(args.data_root, args.cell_timeout_s, tmp),
        "shared": lambda: fast.shared(args.data_root, args.shared, args.shared_seconds, start + args.budget_s, tmp),
    }
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            results[name] = sections[name]()
        except Exception as exc:  # noqa: BLE001 - one failing check must not lose the others' results
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(f"== {name} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[name])[:600]}", flush=True)
        save()
    return results


if __name__ == "__main__":
    main()
