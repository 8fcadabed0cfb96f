"""Bounded loopback load: the Ray Serve endpoint vs the same ONNX model in-process vs PyTorch eager in-process.

Every request is one PNG-encoded image taken all the way to top-5 labels (decode + preprocess + model), so the
three paths do the same work; the Serve path adds HTTP, the proxy hop and @serve.batch queueing. Each path
gets the same CPU share (ORT intra-op threads = torch threads = the replica's num_cpus), a fixed number of
requests per concurrency level, one run. Results: bench/results/serve_throughput.json.

    python bench/serve_throughput.py [--checkpoint CKPT] [--requests 200] [--concurrency 1 4 16]
"""

import argparse
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mbib
from mbib.checkpoint import model_from_checkpoint, save_checkpoint
from mbib.data.datasets import resolve_data_root
from mbib.export import export_onnx
from mbib.models import build_model, ensemble_logits
from mbib.serving import OnnxClassifier, ServeSettings, build_app

RESULTS = Path(__file__).parent / "results" / "serve_throughput.json"


def sample_images(count: int, size: int = 32) -> np.ndarray:
    """uint8 [N, size, size, 3]: real MNIST test digits when MBIB_DATA_ROOT has them, else seeded noise."""
    root = resolve_data_root(None)
    path = root / "mnist10k.npz" if root is not None else None
    if path is not None and path.is_file():
        digits = np.load(path)["x_test"][:: 1500 // count][:count, :, :, 0]
        return np.stack([np.asarray(Image.fromarray(d).resize((size, size)).convert("RGB")) for d in digits])
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def normalised(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def random_checkpoint(run_dir: Path, images: np.ndarray) -> Path:
    """Untrained resnet32 MBIB (throughput does not depend on weights), BatchNorm statistics set on real images."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model("resnet32", 10, head="mbib")
    mean, std = [0.1307] * 3, [0.3081] * 3
    with torch.no_grad():  # untrained running stats of 0/1 make logits explode through 32 layers
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        model(normalised(images, mean, std))
    return save_checkpoint({"model": model.state_dict(),
                            "model_spec": {"name": "resnet32", "num_classes": 10, "options": {"head": "mbib"}},
                            "data_spec": {"dataset": "mnist-lt", "classes": [str(i) for i in range(10)],
                                          "mean": mean, "std": std, "image_size": 32, "class_counts": [1] * 10}}, run_dir)


def png_bodies(images: np.ndarray) -> list[bytes]:
    bodies = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    return bodies


def run_load(call, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    """`requests` calls spread over `concurrency` threads; req/s over the whole run, latency percentiles in ms."""
    def one(i: int) -> float:
        start = time.perf_counter()
        call(bodies[i % len(bodies)])
        return time.perf_counter() - start

    for i in range(min(8, requests)):  # warm-up outside the measurement
        one(i)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = np.asarray(list(pool.map(one, range(requests))))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "req_per_s": round(requests / wall, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="mbib checkpoint (default: an untrained resnet32)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPU share of the replica and of each in-process path")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    threads = max(1, int(args.num_cpus))
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="mbib-bench-"))
    images = sample_images(64)
    ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(tmp / "run", images)
    model, state = model_from_checkpoint(ckpt)
    spec = state["data_spec"]
    onnx_path = tmp / "model.onnx"
    images = sample_images(64, int(spec["image_size"]))
    parity = export_onnx(ckpt, onnx_path, parity_images=normalised(images[:16], spec["mean"], spec["std"]))
    ort_model = OnnxClassifier(onnx_path, num_threads=threads, use_cuda=False)
    bodies = png_bodies(images)

    def in_process_ort(body: bytes) -> list:
        return ort_model.top_k(ort_model.probabilities(ort_model.preprocess(body)[None])[0], 5)

    def torch_eager(body: bytes) -> list:
        x = torch.from_numpy(ort_model.preprocess(body)[None])
        with torch.inference_mode():
            probs = torch.softmax(ensemble_logits(model(x)), dim=1)[0].numpy()
        return ort_model.top_k(probs, 5)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(model_path=str(onnx_path), num_replicas=1, num_cpus=args.num_cpus, num_gpus=0,
                             max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
    serve.run(build_app(settings), name="bench", route_prefix="/")
    limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits)

    def serve_http(body: bytes) -> list:
        response = client.post("/classify", content=body, headers={"content-type": "image/png"})
        response.raise_for_status()
        return response.json()["predictions"]

    results = {}
    try:
        for name, call in (("serve_http", serve_http), ("ort_in_process", in_process_ort), ("torch_eager_in_process", torch_eager)):
            results[name] = [run_load(call, bodies, args.requests, c) for c in args.concurrency]
    finally:
        client.close()
        serve.shutdown()
        ray.shutdown()
    ratio = [round(s["req_per_s"] / o["req_per_s"], 3) for s, o in zip(results["serve_http"], results["ort_in_process"])]
    report = {
        "what": "req/s and latency per request (PNG bytes -> top-5), loopback, one run",
        "model": {"name": state["model_spec"]["name"], "image_size": ort_model.image_size, "exporter": parity["exporter"],
                  "parity_max_abs_diff_logits": parity["max_abs_diff_logits"]},
        "settings": {"requests_per_level": args.requests, "concurrency": args.concurrency, "num_cpus": args.num_cpus,
                     "threads_per_path": threads, "max_batch_size": args.max_batch_size,
                     "batch_wait_timeout_s": args.batch_wait_timeout_s, "replicas": 1},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "onnxruntime": __import__("onnxruntime").__version__, "mbib": mbib.__version__},
        "results": results,
        "serve_over_ort_in_process_req_per_s": dict(zip(map(str, args.concurrency), ratio)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
