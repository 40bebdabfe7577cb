"""Numeric faults skip the step without touching the weights; signals stop cleanly."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpo_lora.train.loop as trainer_module
from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import step_name

from ..conftest import REPO
from .test_loop import read_metrics, tiny_config

RUN = [
    "lora.dropout=0.0",
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "data.eval=null",
    "train.save_every=1",
    "train.keep_checkpoints=0",
]


def plant_nan(monkeypatch, bad_calls: set[int]):
    """Make the loss of the given preference_step calls (0-based, training only) NaN."""
    real = trainer_module.preference_step
    calls = []

    def faulty(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan, stats) if len(calls) - 1 in bad_calls else (loss, stats)

    monkeypatch.setattr(trainer_module, "preference_step", faulty)


def adapter_at(output_dir, step: int) -> dict[str, torch.Tensor]:
    states = output_dir / "checkpoints" / step_name(step) / "deepspeed" / "mp_rank_00_model_states.pt"
    return torch.load(states, weights_only=False)["module"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2"])
def test_non_finite_loss_skips_the_step_and_leaves_the_weights(tiny_model_dir, tmp_path, monkeypatch, zero, dtype):
    plant_nan(monkeypatch, {4})  # step 3, first micro-batch (grad_accum=2)
    out = tmp_path / "run"
    deepspeed_json = REPO / "deepspeed_configs" / f"{zero}.json"
    config = tiny_config(
        tiny_model_dir, out, *RUN, "train.max_steps=5", f"deepspeed={deepspeed_json}", f"model.dtype={dtype}"
    )
    trainer_module.train(config)
    rows = read_metrics(out)
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["step"], r["skipped"]) for r in skipped] == [(3, "loss")]
    assert len(skipped[0]["rows"]) == 2, "the bad micro-batch's source rows are named"
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    before, at, after = adapter_at(out, 2), adapter_at(out, 3), adapter_at(out, 4)
    assert before.keys() == at.keys() and len(before) > 0
    for name in before:
        assert torch.equal(before[name], at[name]), f"{name} changed in the skipped step"
    assert any(not torch.equal(at[name], after[name]) for name in at), "training resumes after the bad step"
    assert all(torch.isfinite(t).all() for t in after.values())


def test_too_many_bad_steps_in_a_row_abort_with_a_clear_message(tiny_model_dir, tmp_path, monkeypatch):
    plant_nan(monkeypatch, set(range(2, 100)))  # fine for step 1, then every loss is NaN
    config = tiny_config(tiny_model_dir, tmp_path / "run", *RUN, "train.max_steps=10", "train.max_bad_steps=3")
    with pytest.raises(UserError, match=r"aborting at step 4: 3 optimizer steps in a row had a non-finite loss"):
        trainer_module.train(config)


def test_fp16_loss_scale_overflows_are_skipped_without_counting_as_bad_steps(tiny_model_dir, tmp_path, fp16_on_cpu):
    """An initial scale of 2^22 overflows fp16 gradients: the scaler skips and halves for a few
    steps. Those steps must not count toward max_bad_steps (2 here), or the run would abort."""
    import json

    deepspeed_json = tmp_path / "zero2_fp16.json"
    shipped = json.loads((REPO / "deepspeed_configs" / "zero2.json").read_text())
    shipped["fp16"].update(initial_scale_power=22, hysteresis=1)
    deepspeed_json.write_text(json.dumps(shipped))
    out = tmp_path / "run"
    config = tiny_config(
        tiny_model_dir, out, *RUN, "train.max_steps=12", "train.max_bad_steps=2", "model.dtype=float16",
        "model.quantization=nf4", f"deepspeed={deepspeed_json}",
    )  # fmt: skip
    trainer_module.train(config)
    rows = read_metrics(out)
    skipped = [r["step"] for r in rows if r.get("skipped") == "loss-scale overflow"]
    trained = [r["step"] for r in rows if "loss" in r]
    assert len(skipped) >= 2, f"the test needs overflows in a row to mean anything: {skipped}"
    assert skipped == list(range(1, len(skipped) + 1)), "the first steps overflow, then the scale fits"
    assert trained and trained[-1] == 12 and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_a_second_signal_exits_at_once():
    code = (
        "import time; from dpo_lora.train.guards import StopRequest; s = StopRequest(); print('ready', flush=True)\n"
        "while True: time.sleep(0.01)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert process.poll() is None, "the first signal only requests a stop"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 128 + signal.SIGTERM


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e3])
def test_zero0_clipping_scales_to_the_norm_bound_against_a_float64_oracle(max_norm):
    from dpo_lora.train.guards import SkippableAdamW, clip_as_zero_stages

    generator = torch.Generator().manual_seed(int(max_norm * 1000))
    grads = [torch.randn(shape, generator=generator) * 0.1 for shape in ((16, 8), (8,), (3, 5, 7))]
    norm64 = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    expected = [g.double() * min(1.0, max_norm / (norm64 + 1e-6)) for g in grads]
    total_norm = clip_as_zero_stages(grads, max_norm)
    assert float(total_norm) == pytest.approx(norm64, rel=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # As the optimizer's step: the update is taken from the clipped gradients, the norm kept.
    weights = [torch.nn.Parameter(torch.zeros(4))]
    weights[0].grad = torch.full((4,), 3.0)
    optimizer = SkippableAdamW(weights, lr=0.1)
    optimizer.max_grad_norm = max_norm
    optimizer.step()
    assert float(optimizer._global_grad_norm) == pytest.approx(6.0)
    torch.testing.assert_close(weights[0].grad, torch.full((4,), 3.0 * min(1.0, max_norm / (6.0 + 1e-6))))


def test_the_poison_leaves_a_good_loss_exact_and_makes_every_gradient_nan_for_a_bad_one():
    from dpo_lora.train.guards import NumericGuard

    weight = torch.randn(3, requires_grad=True)
    for bad in (False, True):
        weight.grad = None
        loss = (weight**2).sum()
        flag = NumericGuard.loss_is_bad(loss) | torch.tensor(bad)  # another rank's bad loss
        poisoned = NumericGuard.poison(loss, flag)
        poisoned.backward()
        if bad:
            assert torch.isnan(poisoned) and torch.isnan(weight.grad).all()
        else:
            assert poisoned.item() == loss.item() and torch.equal(weight.grad, 2 * weight.detach())
    assert NumericGuard.loss_is_bad(torch.tensor(math.inf)) and not NumericGuard.loss_is_bad(torch.tensor(1.0))


def test_the_guard_and_the_metric_window_keep_their_values_on_the_device():
    """`meta` stands in for a GPU: reading a meta tensor's value raises, as a read from a GPU waits."""
    from dpo_lora.train.guards import NumericGuard
    from dpo_lora.train.metrics import PAIR_METRICS, MetricWindow

    meta = torch.device("meta")
    loss = torch.ones((), device=meta, requires_grad=True)
    bad = NumericGuard.loss_is_bad(loss)
    assert bad.device == meta and NumericGuard.poison(loss, bad).device == meta
    window = MetricWindow()
    for _ in range(2):
        window.add({name: torch.ones(2, device=meta) for name in PAIR_METRICS}, tokens=3)
    assert window.sums.device == meta and window.tokens == 6
    with pytest.raises(Exception, match="meta"):
        torch.ones(2, device=meta).sum().item()  # what the window did per step before
