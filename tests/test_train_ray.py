"""The training engine on a real local Ray: DDP sync, fault-tolerant resume, MLflow records, NaN handling."""

import mlflow
import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient

from mbib.checkpoint import load_checkpoint
from mbib.config import TrainConfig, apply_overrides
from mbib.errors import TrainingError
from mbib.train.runner import build_trainer, run_training

pytestmark = pytest.mark.slow


def tiny(tmp_path, **extra) -> TrainConfig:
    base = {"data.dataset": "digits-lt", "data.imbalance_factor": 10, "data.limit_train": 96,
            "data.limit_test": 60, "optim.epochs": 3, "optim.batch_size": 32, "optim.warmup_epochs": 1,
            "optim.milestones": "", "optim.milestone_factors": "", "runtime.eval_every": 1,
            "runtime.show_progress": False, "runtime.storage_path": str(tmp_path / "runs")}
    base.update(extra)
    return apply_overrides(TrainConfig(), base)


class Collect(ray.train.UserCallback):
    """Keeps every worker's reports; a real callback of the real controller."""

    def __init__(self, sink):
        self.sink = sink

    def after_report(self, run_context, metrics, checkpoint):
        self.sink.append.remote(metrics)


@ray.remote
class Sink:
    def __init__(self):
        self.items = []

    def append(self, x):
        self.items.append(x)

    def get(self):
        return self.items


def test_two_ddp_workers_hold_identical_weights(ray_local, tmp_path):
    cfg = tiny(tmp_path, **{"runtime.num_workers": 2, "optim.epochs": 2, "run_name": "ddp"})
    sink = Sink.remote()
    build_trainer(cfg, [Collect(sink)]).fit()
    reports = ray.get(sink.get.remote())
    assert len(reports) == 2 and all(len(r) == 2 for r in reports)
    for per_worker in reports:
        a, b = (m["param_checksum"] for m in per_worker)
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
    assert reports[0][0]["param_checksum"] != reports[1][0]["param_checksum"]  # and they did train


@pytest.fixture(scope="module")
def tracked(ray_local, tmp_path_factory):
    """One uninterrupted run with MLflow: the MLflow test reads it, the resume test compares against it."""
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return tmp, uri, run_training(tiny(tmp, run_name="tracked", experiment="t"), tracking_uri=uri)


def test_resume_after_injected_fault_equals_uninterrupted(tracked, tmp_path):
    clean = tracked[2]  # same config and seed; MLflow logging does not touch training
    faulty = run_training(tiny(tmp_path, run_name="faulty", **{"runtime.inject_failure_epoch": 1,
                                                               "runtime.max_failures": 1}), track=False)
    a = load_checkpoint(_latest(clean))
    b = load_checkpoint(_latest(faulty))
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    assert a["metrics"]["acc"] == b["metrics"]["acc"]


def _latest(outcome):
    ckpts = sorted(outcome.run_dir.glob("epoch_*/checkpoint.pt"))
    return ckpts[-1]


def test_mlflow_records_params_metrics_and_artifacts(tracked, tmp_path):
    _, uri, out = tracked
    client = MlflowClient(uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.method"] == "mbib" and run.data.params["loss.beta"] == "5.0"
    for key in ("train_bsc_v1", "train_bsc_z:v3", "train_vsd_v2", "train_total", "acc", "many", "few",
                "final_acc", "final_many", "final_medium", "final_few"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train_total")) == 3
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best_checkpoint", "plots", "confusion.json"} <= arts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/per_class_accuracy.png"]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="best_checkpoint",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert load_checkpoint(local)["model_spec"]["name"] == "resnet32"


def test_nan_loss_stops_with_step(ray_local, tmp_path):
    with pytest.raises(TrainingError, match=r"loss became NaN at step 2 \(epoch 0\)"):
        run_training(tiny(tmp_path, run_name="nan", **{"runtime.inject_nan_step": 2}), track=False)
