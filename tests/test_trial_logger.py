"""The study's MLflow trial logger against a real SQLite store: a resumed driver logs exactly the epochs it missed."""

from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from mbib import tracking
from mbib.config import TrainConfig
from mbib.study.spec import BUDGET, SEARCH_SPACE
from mbib.tracking.trials import MLflowTrialLogger


def test_a_resumed_logger_fills_the_epoch_a_killed_driver_missed_and_repeats_none(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = tracking.get_or_create_experiment(client, "t")
    parent = client.create_run(exp).info.run_id
    trial = SimpleNamespace(trial_id="abc_00001", experiment_tag="1_beta=5",
                            config={"train": TrainConfig().to_dict(), **{k: 0.1 for k in SEARCH_SPACE}})
    result = lambda epoch: {BUDGET: epoch, "acc": 10.0 * epoch, "started_at_epoch": 0}  # noqa: E731

    first = MLflowTrialLogger(uri, exp, parent, "digits-lt", 4)
    assert first.log_result(trial, result(1))
    # the driver dies after Tune recorded epoch 2 but before the logger logged it; the trial goes on from epoch 2
    again = MLflowTrialLogger(uri, exp, parent, "digits-lt", 4)  # the --resume driver
    assert again.log_result(trial, result(3)) and again.log_result(trial, result(4))
    # backfill replays Tune's results: only epoch 2 is new
    assert [again.log_result(trial, result(e)) for e in (1, 2, 3, 4)] == [False, True, False, False]
    run_id = again.child_run(trial)
    history = [(int(m.step), m.value) for m in client.get_metric_history(run_id, "acc")]
    assert sorted(history) == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]  # each epoch once
    assert len(client.search_runs([exp])) == 2  # the parent and one child, found again by its trial id
