"""runtime.resume_from's bad input; the run it continues (a checkpoint copied out of a crashed run) ends with the
uninterrupted run's weights in test_train_ray.py's crash test, which shares its Ray runs."""

import pytest

from mbib.config import TrainConfig, apply_overrides
from mbib.errors import ConfigError
from mbib.train.runner import run_training


def tiny(tmp_path, name: str, **extra) -> TrainConfig:
    return apply_overrides(TrainConfig(), {
        "data.dataset": "digits-lt", "data.imbalance_factor": 10, "data.limit_train": 96, "data.limit_test": 30,
        "optim.epochs": 2, "optim.batch_size": 32, "optim.warmup_epochs": 0.5, "runtime.eval_every": 1,
        "runtime.cpus_per_worker": 1, "runtime.show_progress": False, "run_name": name,
        "runtime.storage_path": str(tmp_path / name), **extra})


def test_missing_resume_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not a file") as err:
        run_training(tiny(tmp_path, "x", **{"runtime.resume_from": str(tmp_path / "nope.pt")}), track=False)
    assert "\n" not in str(err.value)
