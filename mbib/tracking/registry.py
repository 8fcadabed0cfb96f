"""The model registry, read side: `resolve_checkpoint` turns a path or an MLflow URI (models:/NAME/VERSION, runs:/...,
mlflow-artifacts:/...) into a local checkpoint.pt (study and export). The study registers in `mbib.study.record`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mbib import tracking
from mbib.checkpoint import CHECKPOINT_FILE, checkpoint_file, load_checkpoint
from mbib.data.split import SELECT_METRIC
from mbib.errors import ConfigError, TrainingError

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def kept_checkpoint(path: str) -> str:
    """The best report's checkpoint, or, when Ray's num_to_keep broke a selection-score tie the other way and deleted
    it (or a killed writer left it partial), the readable sibling with the highest selection score (later on ties)."""
    local = Path(path)
    if "://" in path or _checkpoint_acc(local / CHECKPOINT_FILE) is not None:
        return path
    kept = [(acc, k) for k in sorted(local.parent.glob("epoch_*/" + CHECKPOINT_FILE))
            if (acc := _checkpoint_acc(k)) is not None]
    if not kept:
        raise TrainingError(f"no readable checkpoint left under {local.parent}: was the run's storage deleted?")
    return str(max(enumerate(kept), key=lambda ik: (ik[1][0], ik[0]))[1][1].parent)


def _checkpoint_acc(path: Path) -> float | None:
    """The checkpoint's selection score, or None when it is missing or unreadable (a partial epoch_* folder)."""
    try:
        metrics = load_checkpoint(path).get("metrics", {})
        return float(metrics.get(SELECT_METRIC, metrics.get("acc", -1.0)))  # "acc": checkpoints older than the split
    except TrainingError:
        return None


def load_registered_checkpoint(name: str, version: str | int = "latest", tracking_uri: str | None = None,
                               dst_path: str | os.PathLike | None = None) -> Path:
    """Download a registered study model and return its checkpoint.pt (what `mbib export models:/NAME/V` reads)."""
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(tracking_uri)
    if str(version) == "latest":
        try:  # resolve through a client on `uri`: models:/ URIs alone would go to the process-wide registry
            client = MlflowClient(uri, registry_uri=uri)
            version = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        except Exception as exc:  # MLflow raises several types for unknown names
            raise ConfigError(f"cannot load models:/{name}/latest from {uri} ({type(exc).__name__}): "
                              "check the name and --tracking-uri") from None
    return resolve_checkpoint(f"models:/{name}/{version}", dst_path or tempfile.mkdtemp(prefix="mbib-model-"), uri)


def resolve_checkpoint(source: str | os.PathLike, download_dir: str | os.PathLike,
                       tracking_uri: str | None = None) -> Path:
    """A checkpoint path as given, or the one checkpoint inside an MLflow model/run artifact URI, downloaded from
    `tracking_uri` (None: MLflow's process-wide store, as `mlflow.set_tracking_uri` or $MLFLOW_TRACKING_URI set it)."""
    text = str(source)
    if not text.startswith(MLFLOW_SCHEMES):
        return checkpoint_file(text)
    import mlflow

    where = f" from {tracking_uri}" if tracking_uri else " from MLflow"
    try:
        if tracking_uri and text.startswith("models:/"):  # models:/ alone would go to the process-wide registry
            from mlflow.tracking import MlflowClient

            name, version = text[len("models:/"):].rsplit("/", 1)
            text = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(download_dir),
                                                         tracking_uri=tracking_uri))
    except Exception as exc:  # MLflow raises several types for unknown names and versions
        raise ConfigError(f"cannot download {source}{where} ({type(exc).__name__}): check the URI and "
                          f"{'--tracking-uri' if tracking_uri else 'MLFLOW_TRACKING_URI'}") from None
    if local.is_file():
        return local
    found = sorted(local.rglob(CHECKPOINT_FILE)) or sorted(local.rglob("*.pt"))
    if len(found) != 1:
        raise ConfigError(f"{source} holds {len(found)} checkpoint files, expected one {CHECKPOINT_FILE}: log the "
                          "checkpoint as an artifact of the registered model")
    return found[0]
