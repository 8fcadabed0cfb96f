"""MLflow tracking, every write of it: a local SQLite store by default, one writer at a time.

This module: the store (URI, reachability, experiments) and the batched writes every run uses. trials: a study's
parent and child runs; registry: registering a study's best checkpoint and resolving models:/ and runs:/ URIs to a
checkpoint.pt (export uses it); runs: a training run, the reproduction's parent run and an export's record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

DEFAULT_DB = "mlflow.db"
# MLflow 3's UI opens experiments without this tag on the GenAI traces overview; ours hold training runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(uri: str | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the working directory (MLflow 3 refuses ./mlruns)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB}"


ARTIFACTS_DIR = "mlartifacts"  # a SQLite store's artifacts live in this folder beside it (tracking.moved follows it)


def store_client(uri: str):
    """An MlflowClient whose registry is the tracking store itself: mbib keeps a study's runs and its registered
    models in one store (what `models:/` URIs given with --tracking-uri resolve against), never in a registry an
    inherited MLFLOW_REGISTRY_URI names (`mlflow.set_registry_uri` exports it to every child process)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail in one line, before any work starts, when an http(s) tracking URI has no MLflow server behind it."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from mbib.errors import ConfigError

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"no MLflow server answers at {uri} ({reason}): start it (mlflow server --port ...) "
                          "or pass another --tracking-uri") from None


def get_or_create_experiment(client, name: str, artifact_root: str | None = None) -> str:
    """Create experiments on the driver only: concurrent set_experiment calls race."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for k, v in EXPERIMENT_KIND.items():
            if k not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    uri = client._tracking_client.tracking_uri  # the client's store, not the environment's: a server keeps its own
    if artifact_root is None and uri.startswith("sqlite:///"):
        artifact_root = (Path(uri[len("sqlite:///"):]).resolve().parent / ARTIFACTS_DIR / name).as_uri()  # relative URIs too
    return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


def log_dataset(client, run_id: str, name: str, data, context: str = "training") -> None:
    """Record the data set as an MLflow dataset input (the UI's Dataset column): its name, the DataConfig
    settings that make it, and a digest of those, so runs on the same data show the same entry."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    text = json.dumps(dataset_source(data), sort_keys=True, default=str)
    ds = Dataset(name=name, digest=hashlib.sha256(text.encode()).hexdigest()[:8], source_type="mbib", source=text)
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


def dataset_source(data) -> dict[str, Any]:
    """The DataConfig settings that make a run's data set, as MLflow's dataset entry records (and digests) them."""
    source = {k: getattr(data, k) for k in ("dataset", "imbalance_factor", "limit_train", "limit_test", "augment")}
    dose = getattr(data, "recompress", "none")
    if dose != "none":  # a dosed set is other data; undosed data keeps the digest it always had
        source["recompress"] = dose
    return source


def metric_name(key: str) -> str:
    """MLflow names allow no '@': the loss term "bsc_z@v1" (z's BSC in BIB(v1, z)) is logged as "bsc_z:v1"."""
    return key.replace("@", ":")


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if items:
        client.log_batch(run_id, metrics=items)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i:i + 100])


def confusion_summary(confusion, classes: Sequence[str], class_counts: Sequence[int], top: int = 3) -> dict:
    """Per-class accuracy, size and the classes each is most often mistaken for."""
    import torch

    conf = torch.as_tensor(confusion, dtype=torch.float64)
    rows = conf.sum(1).clamp_min(1)
    per_class = (conf.diag() / rows * 100).tolist()
    off = conf.clone()
    off.fill_diagonal_(0)
    out = []
    for i, name in enumerate(classes):
        vals, idx = off[i].topk(min(top, len(classes)))
        out.append({"class": name, "train_images": int(class_counts[i]), "accuracy": per_class[i],
                    "confused_with": [{"class": classes[j], "count": int(v)}
                                      for v, j in zip(vals.tolist(), idx.tolist()) if v > 0]})
    return {"per_class": out, "confusion_matrix": conf.to(torch.int64).tolist()}


def write_json(obj: Any, path: str | Path) -> Path:
    Path(path).write_text(json.dumps(obj, indent=1))
    return Path(path)
