"""Bounded loopback load: the Ray Serve endpoint (HAProxy ingress, Ray's proxy) vs a plain uvicorn server vs the same
ONNX model in-process.

Every request is one PNG-encoded image taken all the way to top-5 labels (decode + preprocess + model), so the
paths do the same work: Serve adds HTTP, the ingress-to-replica hop and @serve.batch queueing; the plain server
(bench/plain_asgi.py, what a user would pick instead) adds HTTP only; PyTorch eager in-process is the framework
anchor. Each path gets the same CPU share (ORT intra-op threads = torch threads = the replica's num_cpus). The
paths take turns in rounds, so a machine whose load drifts (other jobs) shifts them alike; medians are reported,
with the load average, and a breakdown of one request's time. Results: bench/results/serve_throughput.json.

    python bench/serve_throughput.py [--checkpoint CKPT] [--requests 200] [--rounds 3] [--concurrency 1 4 16]
"""

import argparse
import io
import json
import os
import platform
import subprocess
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
from mbib.raylocal import free_port
from mbib.classifier import OnnxClassifier
from mbib.ingress import HA_PROXY
from mbib.serving import ServeSettings, build_app
from mbib.train.engine import cpu_description

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
    return {"req_per_s": round(requests / wall, 1), "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2)}


def median_ms(work, repeats: int = 200) -> float:
    """Median wall time of one call, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 3)


def start_plain_server(onnx_path: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """bench/plain_asgi.py under uvicorn, one process; returns it and its base URL once it answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "MBIB_BENCH_MODEL": str(onnx_path), "MBIB_BENCH_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "plain_asgi:app", "--app-dir", str(Path(__file__).parent),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the plain uvicorn server did not come up in 60 s")


def http(client, path: str):
    def call(body: bytes) -> list:
        response = client.post(path, content=body, headers={"content-type": "image/png"})
        response.raise_for_status()
        return response.json()["predictions"]
    return call


def empty(client, path: str):
    return lambda body: client.get(path).raise_for_status()


def round_trips(serve_client, plain_client, bodies: list[bytes], requests: int) -> dict:
    """Where one request's time goes at concurrency 1 (p50 ms): round trips with no work, and with the body read."""
    def refused(query: str, expected: int, body_of=lambda body: body):
        """A POST /classify that the replica answers with `expected` before the model: the hops without the work."""
        def call(body: bytes) -> None:
            response = serve_client.post("/classify" + query, content=body_of(body), headers={"content-type": "image/png"})
            assert response.status_code == expected, response.text
        return call

    return {"serve_empty_round_trip_ms": run_load(empty(serve_client, "/healthz"), bodies, requests, 1)["p50_ms"],
            "serve_post_refused_before_reading_body_ms": run_load(refused("?top_k=0", 422), bodies, requests, 1)["p50_ms"],
            "serve_post_body_read_then_refused_ms": run_load(refused("", 415, lambda body: b"x" * len(body)), bodies,
                                                             requests, 1)["p50_ms"],
            "plain_empty_round_trip_ms": run_load(empty(plain_client, "/healthz"), bodies, requests, 1)["p50_ms"]}


def summarise(rounds: list[dict], paths: list[str]) -> dict:
    """Median req/s and p50 over the rounds per path (the load of the machine varies between rounds)."""
    return {name: {"req_per_s": float(np.median([r[name]["req_per_s"] for r in rounds])),
                   "p50_ms": float(np.median([r[name]["p50_ms"] for r in rounds])),
                   "p99_ms": float(np.median([r[name]["p99_ms"] for r in rounds])),
                   "req_per_s_each_round": [r[name]["req_per_s"] for r in rounds]} for name in paths}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="mbib checkpoint (default: an untrained resnet32)")
    parser.add_argument("--requests", type=int, default=200, help="requests per path, concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all paths; medians are reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPU share of the replica and of each other path")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=ServeSettings.batch_wait_timeout_s)
    parser.add_argument("--ingress", nargs="+", choices=["haproxy", "proxy"], default=["haproxy", "proxy"],
                        help="Serve ingresses to measure, each in a Ray of its own: HAProxy (the default) and Ray's proxy")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    threads = max(1, int(args.num_cpus))
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
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

    plain_proc, plain_base = start_plain_server(onnx_path, threads)
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray starts its workers at nice 15: the same priority as the plain server
    limits = httpx.Limits(max_connections=max(args.concurrency), max_keepalive_connections=max(args.concurrency))
    plain_client = httpx.Client(base_url=plain_base, timeout=60, limits=limits)
    results = {str(c): {} for c in args.concurrency}
    breakdown, batches, empty_rps = {}, {}, {}
    try:
        for ingress in args.ingress:  # one Ray per ingress: the controller reads the choice when Ray starts
            os.environ[HA_PROXY] = "1" if ingress == "haproxy" else "0"
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     configure_logging=False, log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = ServeSettings(model_path=str(onnx_path), num_replicas=1, num_cpus=args.num_cpus, num_gpus=0,
                                     max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
            serve.run(build_app(settings), name="bench", route_prefix="/")
            serve_client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits)
            try:
                # the plain server and in-process paths run again beside each ingress: each ratio is within one Ray
                paths = {f"serve_{ingress}": http(serve_client, "/classify"), f"plain_asgi_beside_{ingress}":
                         http(plain_client, "/classify"), f"ort_in_process_beside_{ingress}": in_process_ort,
                         f"torch_eager_in_process_beside_{ingress}": torch_eager}
                for c in args.concurrency:
                    rounds = [{name: run_load(call, bodies, args.requests, c) for name, call in paths.items()}
                              for _ in range(args.rounds)]
                    results[str(c)].update(summarise(rounds, list(paths)))
                breakdown[ingress] = round_trips(serve_client, plain_client, bodies, args.requests)
                batches[ingress] = serve_client.get("/healthz").json()["batch_sizes"]
                empty_rps[ingress] = run_load(empty(serve_client, "/healthz"), bodies, args.requests,
                                              max(args.concurrency))["req_per_s"]
            finally:
                serve_client.close()
                serve.shutdown()
                ray.shutdown()
        empty_rps["plain"] = run_load(empty(plain_client, "/healthz"), bodies, args.requests, max(args.concurrency))["req_per_s"]
        x = ort_model.preprocess(bodies[0])[None]
        probs = ort_model.probabilities(x)[0]
        breakdown["work"] = {  # the work itself, with no HTTP (medians)
            "decode_preprocess_ms": median_ms(lambda: ort_model.preprocess(bodies[0])),
            "model_batch1_ms": median_ms(lambda: ort_model.probabilities(x)),
            "model_batch16_per_image_ms": round(median_ms(lambda: ort_model.probabilities(np.repeat(x, 16, 0)), 50) / 16, 3),
            "top5_json_ms": median_ms(lambda: json.dumps({"predictions": ort_model.top_k(probs, 5)})),
        }
    finally:
        plain_client.close()
        plain_proc.terminate()
        plain_proc.wait(timeout=30)

    def ratio(a: str, b: str) -> dict:
        return {c: round(r[a]["req_per_s"] / r[b]["req_per_s"], 3) for c, r in results.items()}

    report = {
        "what": "req/s and latency per request (PNG bytes -> top-5), loopback, one run: per Serve ingress (one Ray "
                "each, in turn) the Serve endpoint, the plain server and the in-process paths interleaved in "
                f"{args.rounds} rounds per concurrency, medians over the rounds",
        "model": {"name": state["model_spec"]["name"], "image_size": ort_model.image_size, "exporter": parity["exporter"],
                  "parity_max_abs_diff_logits": parity["max_abs_diff_logits"]},
        "settings": {"requests_per_level_and_round": args.requests, "rounds": args.rounds, "concurrency": args.concurrency,
                     "num_cpus": args.num_cpus, "threads_per_path": threads, "max_batch_size": args.max_batch_size,
                     "batch_wait_timeout_s": args.batch_wait_timeout_s, "replicas": 1,
                     "plain_asgi": "bench/plain_asgi.py: FastAPI under uvicorn, one process, work inline, no batching"},
        "machine": {"cpu": cpu_description(), "cpus": os.cpu_count(), "ray_worker_niceness": os.environ["RAY_worker_niceness"], "load_average_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
                    "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__, "mbib": mbib.__version__},
        "results": results,
        "ratios_req_per_s": {ingress: {"serve_over_ort_in_process": ratio(f"serve_{ingress}", f"ort_in_process_beside_{ingress}"),
                                       "serve_over_plain_asgi": ratio(f"serve_{ingress}", f"plain_asgi_beside_{ingress}"),
                                       "plain_asgi_over_ort_in_process": ratio(f"plain_asgi_beside_{ingress}",
                                                                               f"ort_in_process_beside_{ingress}")}
                             for ingress in args.ingress},
        "haproxy_over_proxy_req_per_s": ratio("serve_haproxy", "serve_proxy") if {"haproxy", "proxy"} <= set(args.ingress) else None,
        "breakdown_concurrency_1_p50_ms": breakdown,
        "empty_round_trip_req_per_s_at_max_concurrency": empty_rps,
        "serve_batch_sizes_seen": batches,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
