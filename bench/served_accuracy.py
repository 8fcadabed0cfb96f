"""The registered model behind the real Serve app, scored over HTTP on the held-out half of CIFAR-100's test set.

Each held-out test image is sent as the JPEG file the data set holds (`cifar100.zip`: the bytes training decoded,
no re-encoding) to `POST /classify`; the served top-1 gives accuracy and many / medium / few, compared with the
held-out numbers the checkpoint recorded at its chosen epoch. Results: bench/results/study-cifar100-lt/served.json.

    MBIB_DATA_ROOT=../shared/data python bench/served_accuracy.py \\
        --model models:/mbib-cifar100-lt-if100/1 --tracking-uri sqlite:///bench/results/study-cifar100-lt/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mbib.data.datasets import resolve_data_root  # noqa: E402
from mbib.data.imagefolder import index_imagefolder  # noqa: E402
from mbib.data.split import selection_mask  # noqa: E402
from mbib.ingress import prepare_ingress  # noqa: E402
from mbib.metrics import shot_accuracy  # noqa: E402
from mbib.raylocal import free_port  # noqa: E402
from mbib.tracking.registry import MLFLOW_SCHEMES, resolve_checkpoint  # noqa: E402

OUT = REPO / "bench" / "results" / "study-cifar100-lt" / "served.json"


def heldout_jpegs(zip_path: Path, fraction: float, seed: int) -> tuple[list[bytes], torch.Tensor]:
    """The held-out test images' JPEG bytes and labels, in the order the data layer reads the test set."""
    index = index_imagefolder(zip_path)
    labels = torch.tensor([y for _, y in index.test])
    keep = (~selection_mask(labels, fraction, seed)).nonzero().flatten().tolist()
    with index.reader() as read:
        return [read(index.test[i][0]) for i in keep], labels[keep]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="models:/NAME/V (or a checkpoint path)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--data-root", default=None, help="holds cifar100.zip (default $MBIB_DATA_ROOT)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # where the Serve app's builder reads models:/ from
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "mbib-served"  # the downloaded checkpoint, the export
    state = torch.load(resolve_checkpoint(args.model, scratch, args.tracking_uri), map_location="cpu", weights_only=False)
    data = state["config"]["data"]
    root = resolve_data_root(args.data_root)
    if root is None or not (root / "cifar100.zip").is_file():
        sys.exit("error: cifar100.zip not found: pass --data-root or set MBIB_DATA_ROOT to the folder that holds it")
    jpegs, labels = heldout_jpegs(root / "cifar100.zip", data["selection_split"], data["selection_seed"])

    import httpx
    import ray
    from ray import serve

    from mbib.serve_app import app

    model_path = args.model
    if not args.model.startswith(MLFLOW_SCHEMES):  # a checkpoint file: the export `mbib export` makes
        from mbib.export import export_onnx

        model_path = str(scratch / "model.onnx")
        export_onnx(args.model, model_path, noise_if_no_data=True, record=False)
    ingress = prepare_ingress()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"model_path": model_path, "num_replicas": 1, "num_cpus": 1}), name="mbib", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            def top1(body: bytes) -> int:
                r = client.post("/classify?top_k=1", content=body, headers={"content-type": "image/jpeg"})
                r.raise_for_status()
                return r.json()["predictions"][0]["index"]

            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                preds = torch.tensor(list(pool.map(top1, jpegs)))
            wall = time.perf_counter() - start
    finally:
        serve.shutdown()
        ray.shutdown()
    served = shot_accuracy(preds, labels, state["data_spec"]["class_counts"])
    recorded = {k: state["metrics"][f"heldout_{k}"] for k in ("acc", "many", "medium", "few")}
    report = {"model": args.model, "epoch": int(state["epoch"]) + 1, "images": len(jpegs), "ingress": ingress,
              "served_heldout": {"acc": round(served["overall"], 2), **{k: round(served[k], 2) for k in ("many", "medium", "few")}},
              "recorded_heldout": {k: round(v, 2) for k, v in recorded.items()},
              "difference_points": round(served["overall"] - recorded["acc"], 2),
              "req_per_s": round(len(jpegs) / wall, 1), "clients": args.clients}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
