"""The device tables of the learning rate, the VSD weight and DRW's class weights equal the per-step Python
schedule the engine follows today, at every step of a run."""

import torch

from mbib.config import TrainConfig, apply_overrides
from mbib.train.engine import Engine, load_data
from mbib.train.tables import DeviceSchedules

CPU = torch.device("cpu")


def _engine(method: str, **extra) -> Engine:
    cfg = apply_overrides(TrainConfig(), {"data.dataset": "digits-lt", "data.imbalance_factor": 10,
                                          "loss.method": method, "optim.batch_size": 64, "optim.epochs": 9,
                                          "optim.warmup_epochs": 2.5, "optim.milestones": "5,7",
                                          "optim.milestone_factors": "0.1,0.01", "runtime.fast_step": False,
                                          **extra})
    return Engine(cfg, load_data(cfg), CPU)


def _python_schedule(engine: Engine) -> list[tuple[list[float], float | None, torch.Tensor | None]]:
    """(group lrs, beta, class weights) each step sees on the per-step path, in train_step's order."""
    task, seen = engine.task, []
    for s in range(engine.steps_per_epoch * engine.cfg.optim.epochs):
        if s % engine.steps_per_epoch == 0:
            task.start_epoch(s // engine.steps_per_epoch)
        task.before_step(s, engine.steps_per_epoch)
        weights = getattr(task.criterion, "class_weights", lambda: None)()
        seen.append(([g["lr"] for g in engine.optimizer.param_groups], getattr(task.criterion, "beta", None),
                     None if weights is None else weights.clone()))
        engine.optimizer.step()  # no gradients: moves nothing, keeps LambdaLR's order of calls
        engine.scheduler.step()
    return seen


def _device_schedule(engine: Engine) -> list[tuple[list[float], float | None, torch.Tensor | None]]:
    tables = DeviceSchedules(engine.task, engine.optimizer, engine.scheduler.base_lrs, engine.cfg.optim,
                             engine.steps_per_epoch, CPU)
    seen = []
    for s in range(engine.steps_per_epoch * engine.cfg.optim.epochs):
        tables.apply(torch.tensor([s]))
        weights = tables.class_weights is not None and engine.task.criterion.class_weights()
        seen.append(([g["lr"].clone() for g in engine.optimizer.param_groups],
                     tables.beta_now.clone() if tables.beta is not None else None,
                     weights.clone() if tables.class_weights is not None else None))
    return seen


def test_lr_and_vsd_tables_equal_the_python_schedule_at_every_step():
    python = _python_schedule(_engine("mbib", **{"loss.vsd_warmup_epochs": 3.5}))
    device = _device_schedule(_engine("mbib", **{"loss.vsd_warmup_epochs": 3.5}))
    assert len(python) == len(device) > 50
    for s, ((lrs, beta, _), (lrs_t, beta_t, _)) in enumerate(zip(python, device)):
        # the tensors hold float32, as SGD applies a float lr to float32 weights and the loss multiplies by beta
        assert [torch.tensor(v, dtype=torch.float32) for v in lrs] == lrs_t, s
        assert torch.tensor(beta, dtype=torch.float32) == beta_t, s
    betas = [b for _, b, _ in python]
    assert betas[0] == 0.0 and betas[-1] == 5.0 and len(set(betas)) > 10  # the ramp really ramped
    assert len({lrs[0] for lrs, _, _ in python}) > 10  # warm-up and both milestones


def test_drw_class_weight_table_switches_at_the_defer_epoch():
    python = _python_schedule(_engine("ldam-drw", **{"loss.drw_epoch": 4}))
    device = _device_schedule(_engine("ldam-drw", **{"loss.drw_epoch": 4}))
    switched = 0
    for s, ((_, _, w), (_, _, w_t)) in enumerate(zip(python, device)):
        if w is None:
            assert torch.equal(w_t, torch.ones_like(w_t)), s  # uniform before the defer epoch
        else:
            assert torch.equal(w_t, w), s
            switched += 1
    assert 0 < switched < len(python)
