"""A study folder moved to another path: the SQLite store's artifact paths follow it, a trial's paths follow the
folder Tune restores it from, and a pickled trial logger writes to the store the resuming driver names."""

import pickle
import shutil

from mlflow.tracking import MlflowClient

from mbib import tracking
from mbib.config import TrainConfig
from mbib.study import record
from mbib.study.record import MLflowTrialLogger
from mbib.study.search import moved_with_the_study
from mbib.tracking.moved import follow_moved_store


def _store_with_artifact(root, name="t"):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, name)
    run = client.create_run(exp).info.run_id
    (root / "note.txt").write_text("kept")
    client.log_artifact(run, str(root / "note.txt"))
    return run


def test_a_moved_store_reads_and_writes_artifacts_beside_it_and_leaves_nothing_at_the_old_path(tmp_path):
    old, new = tmp_path / "a", tmp_path / "b" / "c"
    old.mkdir()
    run = _store_with_artifact(old)
    shutil.move(old, new)
    uri = f"sqlite:///{new / 'mlflow.db'}"
    assert follow_moved_store(uri) == 2  # the experiment's location and the run's artifact URI
    client = MlflowClient(uri)
    assert client.get_run(run).info.artifact_uri == (new / "mlartifacts" / "t").as_uri() + f"/{run}/artifacts"
    assert (client.download_artifacts(run, "note.txt", str(tmp_path)) and (tmp_path / "note.txt").read_text() == "kept")
    client.log_artifact(run, str(new / "note.txt"), artifact_path="again")
    assert not old.exists()
    assert follow_moved_store(uri) == 0  # once pointed here, nothing more to do


def test_a_store_whose_artifacts_live_elsewhere_on_purpose_is_left_alone(tmp_path):
    store, elsewhere = tmp_path / "store", tmp_path / "shared" / "mlartifacts"
    store.mkdir()
    elsewhere.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    tracking.get_or_create_experiment(client, "t", artifact_root=(elsewhere / "t").as_uri())
    assert follow_moved_store(f"sqlite:///{store / 'mlflow.db'}") == 0
    assert client.get_experiment_by_name("t").artifact_location == (elsewhere / "t").as_uri()


def test_a_trial_trains_in_the_folder_it_was_restored_from_and_finds_data_where_the_driver_says(tmp_path, monkeypatch):
    cfg = TrainConfig()
    cfg.runtime.storage_path, cfg.data.data_root = "/gone/study/train_runs", "/gone/data"
    monkeypatch.setenv("MBIB_DATA_ROOT", str(tmp_path))
    moved = moved_with_the_study(cfg, str(tmp_path / "study"))
    assert (moved.runtime.storage_path, moved.data.data_root) == (str(tmp_path / "study" / "train_runs"), str(tmp_path))
    remote = TrainConfig()
    remote.runtime.storage_path, remote.data.data_root = "s3://b/study/train_runs", str(tmp_path)
    kept = moved_with_the_study(remote, None)  # remote storage and a data root that exists stay as they are
    assert (kept.runtime.storage_path, kept.data.data_root) == ("s3://b/study/train_runs", str(tmp_path))


def test_a_restored_trial_logger_writes_to_the_store_the_resuming_driver_names(monkeypatch):
    blob = pickle.dumps(MLflowTrialLogger("sqlite:////first/machine/mlflow.db", "1", "p", "cifar100-lt-if100", 200))
    monkeypatch.setattr(record, "RESTORED_STORE", {"cifar100-lt-if100": "sqlite:////here/mlflow.db"})
    assert pickle.loads(blob).uri == "sqlite:////here/mlflow.db"
    monkeypatch.setattr(record, "RESTORED_STORE", {})
    assert pickle.loads(blob).uri == "sqlite:////first/machine/mlflow.db"
