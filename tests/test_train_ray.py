"""The training engine on a real local Ray: DDP sync, fault-tolerant resume (restarts, a rerun of the run name,\nruntime.resume_from), MLflow records, NaN handling."""

from pathlib import Path

import mlflow
import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient

from mbib import tracking
from mbib.checkpoint import load_checkpoint
from mbib.config import TrainConfig, apply_overrides
from mbib.errors import TrainingError
from mbib.train.runner import CopyLatestCheckpoint, MLflowReportCallback, build_trainer, run_training

pytestmark = pytest.mark.slow


def tiny(tmp_path, **extra) -> TrainConfig:
    base = {"data.dataset": "digits-lt", "data.imbalance_factor": 10, "data.limit_train": 96,
            "data.limit_test": 60, "optim.epochs": 4, "optim.batch_size": 32, "optim.warmup_epochs": 1,
            "optim.milestones": "", "optim.milestone_factors": "", "runtime.eval_every": 2,
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


def _assert_same_weights(clean_dir, resumed_dir):
    a, b = (load_checkpoint(sorted(d.glob("epoch_*/checkpoint.pt"))[-1]) for d in (clean_dir, resumed_dir))
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    assert a["metrics"]["acc"] == b["metrics"]["acc"]


def test_fault_between_checkpoints_restarts_replays_and_logs_each_step_once(tracked, ray_local, tmp_path):
    """Checkpoints after epochs 1 and 3; the fault hits after epoch 2, so the restart replays epoch 2."""
    tmp, uri, clean = tracked
    cfg = tiny(tmp_path, run_name="faulty", **{"runtime.inject_failure_epoch": 2, "runtime.max_failures": 1})
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.get_or_create_experiment(client, "t")).info.run_id
    sink = Sink.remote()
    result = build_trainer(cfg, [Collect(sink), MLflowReportCallback(uri, run_id)]).fit()
    epochs = [int(r[0]["epoch"]) for r in ray.get(sink.get.remote())]
    starts = 1 + sum(b <= a for a, b in zip(epochs, epochs[1:]))  # a new start reports an epoch already seen
    assert epochs == [0, 1, 2, 2, 3] and starts == 2  # the fault fired after epoch 2; one restart, from epoch 1
    for key in ("train_total", "epoch", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1, 2, 3], key
    _assert_same_weights(clean.run_dir, Path(result.path))


def test_crash_says_how_to_resume_and_both_resumes_equal_the_uninterrupted_run(tracked, ray_local, tmp_path):
    """A crash with no restarts left: the same run name continues it here, and a new run continues it from the
    checkpoint copied out (runtime.resume_from, as on another machine); both end with the uninterrupted weights."""
    carry = tmp_path / "carried" / "latest.pt"
    cfg = tiny(tmp_path, run_name="stopped", **{"runtime.inject_failure_epoch": 2})
    with pytest.raises(TrainingError) as err:  # dies after epoch 2, its latest checkpoint epoch 1's
        run_training(cfg, track=False, callbacks=[CopyLatestCheckpoint(carry)])
    message = str(err.value)
    assert "InjectedFault" in message and "--run-name stopped" in message and "--max-failures" in message
    assert "\n" not in message
    assert carry.is_file() and [p.name for p in carry.parent.iterdir()] == ["latest.pt"]  # no temporary left
    resumed = run_training(tiny(tmp_path, run_name="stopped", **{"runtime.inject_failure_epoch": 2}), track=False)
    _assert_same_weights(tracked[2].run_dir, resumed.run_dir)
    moved = run_training(tiny(tmp_path / "elsewhere", run_name="moved", **{"runtime.resume_from": str(carry)}),
                         track=False)
    _assert_same_weights(tracked[2].run_dir, moved.run_dir)
    assert moved.metrics["started_at_epoch"] == 2 and moved.metrics["elapsed_s"] > 0
    # the same run name with another model: one line naming both sides, not torch's load_state_dict report
    with pytest.raises(TrainingError) as err:
        run_training(tiny(tmp_path, run_name="stopped", **{"model.num_taps": 2}), track=False)
    assert "made for resnet32 (head=mbib, num_taps=3) with 10 classes on digits-lt" in str(err.value)
    assert "this run is resnet32 (head=mbib, num_taps=2)" in str(err.value) and "\n" not in str(err.value)


def test_mlflow_records_params_metrics_and_artifacts(tracked, tmp_path):
    _, uri, out = tracked
    client = MlflowClient(uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.method"] == "mbib" and run.data.params["loss.beta"] == "5.0"
    for key in ("train_bsc_v1", "train_bsc_z:v3", "train_vsd_v2", "train_total", "acc", "many", "few",
                "final_acc", "final_many", "final_medium", "final_few"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train_total")) == 4
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best_checkpoint", "plots", "confusion.json"} <= arts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/per_class_accuracy.png"]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="best_checkpoint",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert load_checkpoint(local)["model_spec"]["name"] == "resnet32"


def test_nan_on_one_ddp_rank_stops_every_rank_and_fails_the_mlflow_run(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path, run_name="nan", experiment="nan", **{"runtime.inject_nan_step": 2, "runtime.num_workers": 2})
    with pytest.raises(TrainingError, match=r"loss became NaN at step 2 \(epoch 0\)"):  # the hook hits the last rank only
        run_training(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["mlflow.runName"] == "nan"
