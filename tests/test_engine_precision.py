"""The CPU fast paths (channels_last, bf16 autocast) against the plain fp32 NCHW step, one MBIB step each."""

import pytest
import torch

from mbib.config import TrainConfig, apply_overrides
from mbib.train import engine as engine_module
from mbib.train.engine import Engine, load_data

CPU = torch.device("cpu")


def one_step(monkeypatch, amp: bool, channels_last: bool, native_bf16: bool = False):
    """Loss of one step, the weights before and after it, and the engine's device options."""
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = apply_overrides(TrainConfig(), {"data.dataset": "digits-lt", "data.imbalance_factor": 10,
                                          "optim.batch_size": 64, "optim.warmup_epochs": 0,
                                          "runtime.amp": amp, "runtime.channels_last": channels_last})
    engine = Engine(cfg, load_data(cfg), CPU)
    before = torch.cat([p.detach().flatten().clone() for p in engine.net.parameters()])
    loss, _ = engine.train_step(next(iter(engine.epoch_batches(0))))
    after = torch.cat([p.detach().flatten() for p in engine.net.parameters()])
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
