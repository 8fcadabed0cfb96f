"""MBIB learns real digits: a couple of hundred steps on MNIST-LT reduce the loss and beat chance by far."""

import pytest
import torch

from mbib.config import TrainConfig, apply_overrides
from mbib.train.engine import Engine, load_data


@pytest.mark.slow
def test_mbib_learns_mnist_lt(data_root):
    cfg = apply_overrides(TrainConfig(), {
        "data.dataset": "mnist-lt", "data.data_root": data_root, "data.imbalance_factor": 100,
        "optim.epochs": 4, "optim.batch_size": 32, "optim.lr": 0.02, "optim.warmup_epochs": 0.5,
        "optim.milestones": "", "optim.milestone_factors": "", "loss.vsd_warmup_epochs": 2.5})
    torch.set_num_threads(2)
    engine = Engine(cfg, load_data(cfg), torch.device("cpu"))
    losses = []
    for epoch in range(cfg.optim.epochs):
        engine.task.start_epoch(epoch)
        for batch in engine.epoch_batches(epoch):
            loss, _ = engine.train_step(batch)
            losses.append(float(loss))
            if len(losses) >= 200:
                break
        if len(losses) >= 200:
            break
    assert len(losses) == 200
    assert engine.task.criterion.beta == 5.0  # the VSD ramp (2.5 epochs of 56 steps) has reached the paper's beta
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)  # even though beta ramps from 0 to 5 meanwhile
    result = engine.evaluate()
    assert result.acc > 40.0, result.metrics()  # chance is 10% on the balanced test set of 1,500 digits
    assert result.few > 20.0, result.metrics()  # the tail classes (19, 11, 7 training images) are learnt too
    assert result.head_acc["z"] > 25.0, result.metrics()  # the bottleneck branch is alive
