"""The study's MLflow trial logger against a real SQLite store: a resumed driver logs exactly the epochs it missed."""

import json
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from mbib import tracking
from mbib.config import TrainConfig
from mbib.study.spec import BUDGET, SEARCH_SPACE
from mbib.study.record import MLflowTrialLogger
from mbib.train.fit import CHECKPOINT_REPORT


def study_store(tmp_path):
    """A real SQLite store with one study parent run, one trial, and a maker of drivers' loggers for them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = tracking.get_or_create_experiment(client, "t")
    parent = client.create_run(exp).info.run_id
    trial = SimpleNamespace(trial_id="abc_00001", experiment_tag="1_beta=5",
                            config={"train": TrainConfig().to_dict(), **{k: 0.1 for k in SEARCH_SPACE}})
    return client, exp, trial, lambda: MLflowTrialLogger(uri, exp, parent, "digits-lt", 4)


def test_a_resumed_logger_fills_the_epoch_a_killed_driver_missed_and_repeats_none(tmp_path):
    client, exp, trial, new_logger = study_store(tmp_path)
    result = lambda epoch: {BUDGET: epoch, "acc": 10.0 * epoch, "started_at_epoch": 0}  # noqa: E731

    first = new_logger()
    assert first.log_result(trial, result(1))
    # the driver dies after Tune recorded epoch 2 but before the logger logged it; the trial goes on from epoch 2
    again = new_logger()  # the --resume driver
    assert again.log_result(trial, result(3)) and again.log_result(trial, result(4))
    # backfill replays Tune's results: only epoch 2 is new
    assert [again.log_result(trial, result(e)) for e in (1, 2, 3, 4)] == [False, True, False, False]
    run_id = again.child_run(trial)
    history = [(int(m.step), m.value) for m in client.get_metric_history(run_id, "acc")]
    assert sorted(history) == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]  # each epoch once
    assert len(client.search_runs([exp])) == 2  # the parent and one child, found again by its trial id


def test_the_checkpoint_epochs_record_arrives_with_the_restored_trials_first_report(tmp_path):
    """Killed after Tune took epoch 2's checkpoint, before the logger logged epoch 2: Tune's restored results lack
    it, so the trial re-sends the checkpoint's report with its first new one, and it is logged once."""
    client, exp, trial, new_logger = study_store(tmp_path)
    first = new_logger()
    assert first.log_result(trial, {BUDGET: 1, "acc": 10.0, "started_at_epoch": 0})
    again = new_logger()
    checkpoint_epoch = json.dumps({"epoch": 1, "acc": 20.0, "started_at_epoch": 0})  # 0-based epoch 1 = 2 done
    assert again.log_result(trial, {BUDGET: 3, "acc": 30.0, "started_at_epoch": 2, CHECKPOINT_REPORT: checkpoint_epoch})
    assert not again.log_result(trial, {BUDGET: 3, CHECKPOINT_REPORT: checkpoint_epoch})  # sent twice: logged once
    run_id = again.child_run(trial)
    assert sorted((int(m.step), m.value) for m in client.get_metric_history(run_id, "acc")) == \
        [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert {int(m.step): m.value for m in client.get_metric_history(run_id, "started_at_epoch")} == {1: 0, 2: 0, 3: 2}
    assert CHECKPOINT_REPORT not in client.get_run(run_id).data.metrics  # a carrier, not a metric
