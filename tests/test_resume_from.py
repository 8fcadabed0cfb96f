"""A run moved to another machine: its latest checkpoint copied out, then continued by a new run with
runtime.resume_from, ends with the same weights as a run that was never interrupted."""

import pytest

from mbib.config import TrainConfig, apply_overrides
from mbib.errors import ConfigError, MBIBError
from mbib.train.runner import CopyLatestCheckpoint, run_training


def tiny(tmp_path, name: str, **extra) -> TrainConfig:
    return apply_overrides(TrainConfig(), {
        "data.dataset": "digits-lt", "data.imbalance_factor": 10, "data.limit_train": 96, "data.limit_test": 30,
        "optim.epochs": 2, "optim.batch_size": 32, "optim.warmup_epochs": 0.5, "runtime.eval_every": 1,
        "runtime.cpus_per_worker": 1, "runtime.show_progress": False, "run_name": name,
        "runtime.storage_path": str(tmp_path / name), **extra})


@pytest.mark.slow
def test_resume_from_a_copied_checkpoint_equals_an_uninterrupted_run(ray_local, tmp_path):
    whole = run_training(tiny(tmp_path, "whole"), track=False)
    carry = tmp_path / "carried" / "latest.pt"
    with pytest.raises(MBIBError):  # the first machine dies after epoch 0's checkpoint
        run_training(tiny(tmp_path, "first", **{"runtime.inject_failure_epoch": 0}), track=False,
                     callbacks=[CopyLatestCheckpoint(carry)])
    assert carry.is_file() and [p.name for p in carry.parent.iterdir()] == ["latest.pt"]  # no temporary left
    second = run_training(tiny(tmp_path, "second", **{"runtime.resume_from": str(carry)}), track=False,
                          callbacks=[CopyLatestCheckpoint(carry)])
    assert second.metrics["epoch"] == 1
    assert second.metrics["param_checksum"] == pytest.approx(whole.metrics["param_checksum"], rel=1e-9)
    assert second.metrics["acc"] == whole.metrics["acc"]
    assert second.metrics["elapsed_s"] > 0


def test_missing_resume_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not a file") as err:
        run_training(tiny(tmp_path, "x", **{"runtime.resume_from": str(tmp_path / "nope.pt")}), track=False)
    assert "\n" not in str(err.value)
