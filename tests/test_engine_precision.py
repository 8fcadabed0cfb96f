"""The CPU fast paths (channels_last, bf16 autocast, torch.compile) against the plain fp32 step: two MBIB steps
each, compared parameter tensor by parameter tensor (update and momentum)."""

import pytest
import torch

from mbib.config import TrainConfig, apply_overrides
from mbib.train import engine as engine_module
from mbib.errors import ConfigError
from mbib.train.engine import COMPILE_MIN_STEPS, Engine, load_data, should_compile

CPU = torch.device("cpu")
# Per-tensor tolerances of two steps (update and momentum, in norm) from the same weights, measured here at lr
# 0.001: at initialisation the first blocks' gradients are small sums of large, cancelling terms, so another
# summation order alone moves them: fp32 channels_last vs NCHW worst 0.078, bf16 vs fp32 worst 0.63 (the first
# conv). A tensor that lost its gradient is off by ~1.0, which both bounds catch (the control in the check).
FP32_REL = 0.15
BF16_REL = 0.8


def two_steps(monkeypatch, amp: bool, channels_last: bool, native_bf16: bool = False, compile: bool = False,
              keep_engine: list | None = None):
    """Losses of two steps; per parameter tensor the weights before and after them and SGD's momentum."""
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = apply_overrides(TrainConfig(), {"data.dataset": "digits-lt", "data.imbalance_factor": 10,
                                          # lr 0.001 and beta ramped as in a real run: at lr 0.1 the first step
                                          # overshoots (the loss rises) and even fp32 in another layout ends 30%
                                          # apart per tensor: chaos, not precision
                                          "optim.batch_size": 64, "optim.warmup_epochs": 0, "optim.lr": 0.001,
                                          "loss.vsd_warmup_epochs": 5,
                                          "runtime.amp": amp, "runtime.channels_last": channels_last,
                                          "runtime.compile": compile})
    engine = Engine(cfg, load_data(cfg), CPU)
    if keep_engine is not None:
        keep_engine.append(engine)
    params = dict(engine.task.train_module.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    batches = iter(engine.epoch_batches(0))
    losses = [float(engine.train_step(next(batches))[0]) for _ in range(2)]
    after = {n: p.detach().clone() for n, p in params.items()}
    momentum = {n: engine.optimizer.state[p]["momentum_buffer"].clone() for n, p in params.items()}
    return losses, before, after, momentum, engine.opts


def tensors_off(ref, got, rel: float) -> list[str]:
    """The parameter tensors whose two-step update or momentum differs from the reference's by more than `rel`
    of the reference's, in norm: a layer that lost its gradient (or got another's) is off by about its whole
    update."""
    _, before, after, momentum, _ = ref
    _, _, after_got, momentum_got, _ = got
    assert before.keys() == after_got.keys()
    off = []
    for name in before:
        update = (after[name] - before[name]).norm()
        assert update > 0, name  # every tensor moved: the comparison below is not 0 <= 0
        if (after_got[name] - after[name]).norm() > rel * update or \
                (momentum_got[name] - momentum[name]).norm() > rel * momentum[name].norm():
            off.append(name)
    return off


def assert_each_tensor_close(ref, got, rel: float) -> None:
    assert not tensors_off(ref, got, rel)
    # the check's own control: one tensor without its update and momentum is caught
    name = next(iter(ref[1]))
    lost = (got[0], got[1], {**got[2], name: ref[1][name]}, {**got[3], name: torch.zeros_like(got[3][name])}, got[4])
    assert tensors_off(ref, lost, rel) == [name]


def test_channels_last_step_matches_nchw(monkeypatch):
    ref = two_steps(monkeypatch, amp=False, channels_last=False)
    got = two_steps(monkeypatch, amp=False, channels_last=True)
    assert not ref[4].channels_last and got[4].channels_last and got[4].amp_dtype is None
    assert all(torch.equal(ref[1][n], got[1][n]) for n in ref[1])  # same seed, same initial weights
    assert got[0][0] == pytest.approx(ref[0][0], rel=1e-5)  # same weights: only the sums' order differs
    # after one update the weights differ by its rounding too: 1.9e-5 measured on one thread (oneDNN's kernels differ)
    assert got[0][1] == pytest.approx(ref[0][1], rel=1e-4)
    assert_each_tensor_close(ref, got, rel=FP32_REL)  # fp32 sums in another order


def test_bf16_autocast_steps_stay_close_to_fp32_per_tensor(monkeypatch):
    ref = two_steps(monkeypatch, amp=False, channels_last=True)
    got = two_steps(monkeypatch, amp=True, channels_last=True, native_bf16=True)
    assert got[4].amp_dtype is torch.bfloat16 and not got[4].grad_scaler
    # bf16 keeps 8 bits of mantissa (~0.4 % per rounding): the losses within 2 %, each tensor within BF16_REL
    assert got[0] == pytest.approx(ref[0], rel=2e-2)
    assert_each_tensor_close(ref, got, rel=BF16_REL)
    assert not all(torch.equal(got[2][n], ref[2][n]) for n in ref[2])  # the switch really changed the arithmetic


def test_amp_off_switch_keeps_fp32_on_a_bf16_cpu(monkeypatch):
    assert two_steps(monkeypatch, amp=False, channels_last=True, native_bf16=True)[4].amp_dtype is None


@pytest.mark.skipif(not engine_module.compiler_available(CPU), reason="torch.compile needs a C++ compiler")
def test_compiled_step_matches_eager(monkeypatch):
    ref = two_steps(monkeypatch, amp=False, channels_last=True)
    engines: list = []
    got = two_steps(monkeypatch, amp=False, channels_last=True, compile=True, keep_engine=engines)
    assert engines[0].compiled and engines[0].step_module is not engines[0].task.train_module  # the step ran compiled
    assert got[0] == pytest.approx(ref[0], rel=1e-4)  # fused kernels sum in another order
    assert_each_tensor_close(ref, got, rel=FP32_REL)
    # checkpoints hold the plain module's names: a compiled run's checkpoint loads into an eager one
    assert all("_orig_mod" not in k for k in engines[0].state_dict()["model"])


def test_compile_decision():
    assert should_compile(None, COMPILE_MIN_STEPS, available=True)  # a long run repays the compile time
    assert not should_compile(None, COMPILE_MIN_STEPS - 1, available=True)  # a short one does not
    assert not should_compile(None, 10**6, available=False)  # no compiler: eager, silently
    assert should_compile(True, 1, available=True) and not should_compile(False, 10**6, available=True)
    with pytest.raises(ConfigError, match="runtime.compile=false"):
        should_compile(True, 1, available=False)


def test_cpu_description_names_the_model_the_capability_and_bf16():
    import torch

    from mbib.train.engine import cpu_description, cpu_has_native_bf16

    text = cpu_description("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu\n")
    assert text == (f"Example CPU 9000, {torch.backends.cpu.get_cpu_capability()}, "
                    f"{'native bf16' if cpu_has_native_bf16() else 'no native bf16'}")
    assert cpu_description().split(",")[0]  # this machine's own name (or platform's), never empty
