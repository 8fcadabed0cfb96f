"""The fast step (mbib.train.fast_step) against the per-batch step: same weights after whole epochs, no host
synchronisation inside an epoch, and a NaN that rolls the epoch back. On the CPU here; the GPU script
(bench/gpu_fast.sh) runs them again with MBIB_TEST_DEVICE=cuda, where the steps are CUDA graphs."""

import contextlib
import os

import pytest
import torch

from mbib.config import TrainConfig, apply_overrides
from mbib.errors import ConfigError, TrainingError
from mbib.train.engine import Engine, load_data

DEVICE = torch.device(os.environ.get("MBIB_TEST_DEVICE", "cpu"))
EPOCHS = 3
# fp32 on the CPU: the same operations in the same order, equal but for float rounding (and LDAM's weight of
# ones before DRW where the per-batch path passes none); on CUDA TF32 is off but cuDNN's autotuned kernels and
# atomics add in other orders over 15 steps
TOL = {"cpu": {"rtol": 1e-5, "atol": 1e-6}, "cuda": {"rtol": 1e-3, "atol": 1e-5}}[DEVICE.type]
if DEVICE.type == "cuda":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def _engine(method: str, fast: bool, **extra) -> Engine:
    cfg = apply_overrides(TrainConfig(), {"data.dataset": "digits-lt", "data.imbalance_factor": 10,
                                          "data.limit_train": 150, "data.limit_test": 100, "data.image_size": 16,
                                          "loss.method": method, "optim.batch_size": 32, "optim.epochs": EPOCHS, "optim.warmup_epochs": 1,
                                          "optim.milestones": "2", "optim.milestone_factors": "0.1",
                                          "runtime.amp": False, "runtime.channels_last": False,
                                          "runtime.compile": False, "runtime.fast_step": fast, **extra})
    return Engine(cfg, load_data(cfg), DEVICE)


def _state(engine: Engine) -> dict[str, torch.Tensor]:
    momentum = {f"momentum.{i}": s["momentum_buffer"] for i, s in enumerate(engine.optimizer.state.values())}
    return {k: v.detach().clone() for k, v in {**engine.task.train_module.state_dict(), **momentum}.items()}


@pytest.mark.parametrize("method,extra", [("mbib", {"loss.vsd_warmup_epochs": 1.5}), ("bsce", {}),
                                          ("ldam-drw", {"loss.drw_epoch": 1})])  # DRW switches on in epoch 1
def test_fast_epochs_equal_per_batch_epochs(method, extra):
    slow, fast = _engine(method, False, **extra), _engine(method, True, **extra)
    assert slow.fast is None and fast.fast is not None
    start = _state(fast)
    for epoch in range(EPOCHS):
        a, b = slow.run_epoch(epoch), fast.run_epoch(epoch)
        assert a.keys() == b.keys()
        for k in a:
            if k != "images_per_s":
                assert b[k] == pytest.approx(a[k], rel=TOL["rtol"], abs=TOL["atol"]), (epoch, k)
    assert fast.global_step == slow.global_step == EPOCHS * slow.steps_per_epoch
    ref, got = _state(slow), _state(fast)
    assert ref.keys() == got.keys() and any(k.startswith("momentum") for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=k)
    moved = [k for k in ref if k.endswith("weight") and not torch.equal(ref[k], start[k])]
    assert len(moved) > 10  # training moved the weights, so equality says something
    if method == "ldam-drw":
        assert torch.equal(fast.task.criterion.class_weights(), slow.task.criterion.class_weights())
    if method == "mbib":
        assert float(fast.task.criterion.beta) == slow.task.criterion.beta == 5.0  # the VSD ramp ran its course
    assert fast.evaluate().acc == slow.evaluate().acc  # evaluation on the resident test set


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def no_host_sync(monkeypatch):
    """Inside the block a read of a tensor's value on the host (.item(), bool(t), a copy to the CPU) fails; on
    CUDA torch's own sync check fails on any synchronising call besides."""

    @contextlib.contextmanager
    def guard():
        def refuse(name):
            def read(*args, **kwargs):
                raise AssertionError(f"host sync inside the epoch: Tensor.{name}")
            return read

        real_to = torch.Tensor.to

        def to(self, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                raise AssertionError("host sync inside the epoch: Tensor.to('cpu')")
            return real_to(self, *args, **kwargs)

        with monkeypatch.context() as m:
            for name in HOST_READS:
                m.setattr(torch.Tensor, name, refuse(name))
            m.setattr(torch.Tensor, "to", to)
            if DEVICE.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                if DEVICE.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")

    return guard


def test_the_fast_epoch_never_reads_the_device(no_host_sync):
    warm = 4 if DEVICE.type == "cuda" else 0  # CUDA: both batch shapes warmed up and captured first (capture syncs)
    for method, extra in (("mbib", {"runtime.inject_nan_step": 10**6}), ("ldam-drw", {"loss.drw_epoch": 1})):
        engine = _engine(method, True, **{**extra, "optim.epochs": warm + 2})
        for epoch in range(warm + 2):
            engine.fast.begin(epoch)
            with no_host_sync() if epoch >= warm else contextlib.nullcontext():
                engine.fast.train_steps()
        assert engine.global_step == (warm + 2) * engine.steps_per_epoch
        assert len(engine.fast.graphs) == (2 if DEVICE.type == "cuda" else 0)  # full and last batch captured
    slow = _engine("mbib", False)
    batch = next(iter(slow.epoch_batches(0)))
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        slow.train_step(batch)  # the guard catches the per-batch path's NaN check


def test_nan_mid_epoch_rolls_the_epoch_back_and_names_its_step():
    probe = _engine("mbib", True)
    bad = probe.steps_per_epoch + 2  # the third step of epoch 1
    engine = _engine("mbib", True, **{"runtime.inject_nan_step": bad})
    engine.run_epoch(0)
    before = _state(engine)
    with pytest.raises(TrainingError, match=f"NaN at step {bad} \\(epoch 1\\).*back at the start of epoch 1"):
        engine.run_epoch(1)
    after = _state(engine)
    assert engine.global_step == engine.steps_per_epoch
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the NaN steps' weights are gone
    assert all(torch.isfinite(v).all() for k, v in after.items() if v.is_floating_point())


def test_fast_step_setting():
    # the default: the fast step on CUDA, the per-batch path on the CPU (no launch latency to save there)
    assert (_engine("mbib", None).fast is not None) == (DEVICE.type == "cuda")
    with pytest.raises(ConfigError, match="runtime.fast_step=true needs data.augment=standard"):
        _engine("mbib", True, **{"data.augment": "strong"})
