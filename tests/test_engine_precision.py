"""The CPU fast paths (channels_last, bf16 autocast, torch.compile) against the plain fp32 step, one MBIB step each."""

import pytest
import torch

from mbib.config import TrainConfig, apply_overrides
from mbib.train import engine as engine_module
from mbib.errors import ConfigError
from mbib.train.engine import COMPILE_MIN_STEPS, Engine, load_data, should_compile

CPU = torch.device("cpu")


def one_step(monkeypatch, amp: bool, channels_last: bool, native_bf16: bool = False, compile: bool = False,
             keep_engine: list | None = None):
    """Loss of one step, the weights before and after it, and the engine's device options."""
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = apply_overrides(TrainConfig(), {"data.dataset": "digits-lt", "data.imbalance_factor": 10,
                                          "optim.batch_size": 64, "optim.warmup_epochs": 0,
                                          "runtime.amp": amp, "runtime.channels_last": channels_last,
                                          "runtime.compile": compile})
    engine = Engine(cfg, load_data(cfg), CPU)
    if keep_engine is not None:
        keep_engine.append(engine)
    before = torch.cat([p.detach().flatten().clone() for p in engine.task.train_module.parameters()])
    loss, _ = engine.train_step(next(iter(engine.epoch_batches(0))))
    after = torch.cat([p.detach().flatten() for p in engine.task.train_module.parameters()])
    return float(loss), before, after, engine.opts


def test_channels_last_step_matches_nchw(monkeypatch):
    loss, before, after, opts = one_step(monkeypatch, amp=False, channels_last=False)
    loss_cl, before_cl, after_cl, opts_cl = one_step(monkeypatch, amp=False, channels_last=True)
    assert not opts.channels_last and opts_cl.channels_last and opts_cl.amp_dtype is None
    assert torch.equal(before, before_cl)  # same seed, same initial weights
    assert loss_cl == pytest.approx(loss, rel=1e-5)
    # fp32 sums in another order: within 1 % of the largest update (a wrong layout moves weights by the update)
    assert (after_cl - after).abs().max() <= 1e-2 * (after - before).abs().max()


def test_bf16_autocast_step_stays_close_to_fp32(monkeypatch):
    loss, before, after, _ = one_step(monkeypatch, amp=False, channels_last=True)
    loss_bf, _, after_bf, opts = one_step(monkeypatch, amp=True, channels_last=True, native_bf16=True)
    assert opts.amp_dtype is torch.bfloat16 and not opts.grad_scaler
    # stated tolerance: bf16 keeps 8 bits of mantissa (~0.4 % per rounding); the loss within 2 %, and no weight
    # moves by more than a tenth of the largest fp32 update away from where fp32 puts it
    assert loss_bf == pytest.approx(loss, rel=2e-2)
    assert (after_bf - after).abs().max() <= 0.1 * (after - before).abs().max()
    assert not torch.equal(after_bf, after)  # the switch really changed the arithmetic


def test_amp_off_switch_keeps_fp32_on_a_bf16_cpu(monkeypatch):
    _, _, _, opts = one_step(monkeypatch, amp=False, channels_last=True, native_bf16=True)
    assert opts.amp_dtype is None


@pytest.mark.skipif(not engine_module.compiler_available(CPU), reason="torch.compile needs a C++ compiler")
def test_compiled_step_matches_eager(monkeypatch):
    loss, before, after, _ = one_step(monkeypatch, amp=False, channels_last=True)
    engines: list = []
    loss_c, before_c, after_c, _ = one_step(monkeypatch, amp=False, channels_last=True, compile=True,
                                            keep_engine=engines)
    assert engines[0].compiled and engines[0].step_module is not engines[0].task.train_module  # the step ran compiled
    assert torch.equal(before, before_c)
    assert loss_c == pytest.approx(loss, rel=1e-4)  # fused kernels sum in another order
    assert (after_c - after).abs().max() <= 1e-2 * (after - before).abs().max()
    # checkpoints hold the plain module's names: a compiled run's checkpoint loads into an eager one
    assert all("_orig_mod" not in k for k in engines[0].state_dict()["model"])


def test_compile_decision():
    assert should_compile(None, COMPILE_MIN_STEPS, available=True)  # a long run repays the compile time
    assert not should_compile(None, COMPILE_MIN_STEPS - 1, available=True)  # a short one does not
    assert not should_compile(None, 10**6, available=False)  # no compiler: eager, silently
    assert should_compile(True, 1, available=True) and not should_compile(False, 10**6, available=True)
    with pytest.raises(ConfigError, match="runtime.compile=false"):
        should_compile(True, 1, available=False)
