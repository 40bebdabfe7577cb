"""The health monitors: each fires on rows that show its failure and stays quiet on rows that do
not, warns once while the failure lasts, and carries its state through a checkpoint; then real
runs of the tiny model, one built to memorise its pairs (saturation) and one at a low lr (quiet)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpo_lora.core.schema import MonitorConfig
from dpo_lora.train.loop import train
from dpo_lora.train.metrics import HEALTH_STATS, MetricWindow, margin_length_correlation
from dpo_lora.train.monitors import HealthMonitors
from dpo_lora.train.step import health_stats

from ..conftest import SENTIMENT_TRAIN
from .test_loop import read_metrics, tiny_config


def row(step: int, ratio: float = 0.0, margin: float = 0.0, accuracy: float = 0.5, corr=None, grad=1.0) -> dict:
    return {
        "step": step,
        "pairs": 8.0,
        "rewards/margins": margin,
        "rewards/accuracies": accuracy,
        "logratios/chosen_per_token": ratio,
        "lengths/chosen": 30.0,
        "rewards/margin_length_corr": corr,
        "grad_norm": grad,
    }


def fired(monitors: HealthMonitors, rows: list[dict]) -> list[tuple[str, int]]:
    return [(w.monitor, w.step) for r in rows for w in monitors.observe_train(r)]


def test_displacement_fires_when_the_chosen_log_probs_fall_while_the_margin_grows_once_while_it_lasts():
    monitors = HealthMonitors(MonitorConfig(kl_nats_per_token=1.0), has_reference=True)
    rows = [
        row(1, ratio=0.0, margin=0.0),
        row(2, ratio=-0.005, margin=0.2),  # within the bound
        row(3, ratio=-0.05, margin=0.0),  # falling, but the margin has not grown
        row(4, ratio=-0.05, margin=0.5),  # fires
        row(5, ratio=-0.08, margin=0.9),  # still holds: no second warning
        row(6, ratio=0.0, margin=0.9),  # cleared
        row(7, ratio=-0.03, margin=1.0),  # fires again
    ]
    assert fired(monitors, rows) == [("displacement", 4), ("displacement", 7)]
    (warning,) = HealthMonitors(MonitorConfig(kl_nats_per_token=1.0), True).observe_train(row(1)) or [None]
    assert warning is None


def test_displacement_names_the_numbers_the_key_and_what_helps():
    monitors = HealthMonitors(MonitorConfig(), has_reference=True)
    monitors.observe_train(row(1))
    warning = next(w for w in monitors.observe_train(row(5, ratio=-0.05, margin=0.4)) if w.monitor == "displacement")
    assert warning.message.startswith("likelihood displacement at step 5: the chosen completions' log-probs fell 0.050")
    for part in ("monitor.displacement_nats_per_token=0.01", "from 0.000 to 0.400", "train.lr", "dpo.beta", "sft"):
        assert part in warning.message
    assert warning.values["logratios/chosen_per_token"] == -0.05


def test_kl_fires_on_either_sign_and_not_without_a_reference():
    config = MonitorConfig(displacement_nats_per_token=1.0, kl_nats_per_token=0.02)
    rows = [row(1, ratio=0.01), row(2, ratio=0.03), row(3, ratio=0.0), row(4, ratio=-0.03)]
    assert fired(HealthMonitors(config, has_reference=True), rows) == [("kl", 2), ("kl", 4)]
    assert fired(HealthMonitors(config, has_reference=False), rows) == []
    assert (
        "+0.90 nats per 30-token completion"
        in HealthMonitors(config, True).observe_train(row(1, ratio=0.03))[0].message
    )


def test_saturation_needs_the_train_ceiling_over_the_window_and_held_out_accuracy_stalled():
    monitors = HealthMonitors(MonitorConfig(window_pairs=16, saturation_evals=2), has_reference=True)
    assert fired(monitors, [row(1, accuracy=1.0), row(2, accuracy=1.0)]) == []  # no eval yet
    assert monitors.observe_eval(2, {"eval/rewards/accuracies": 0.6}) == []
    assert monitors.observe_eval(4, {"eval/rewards/accuracies": 0.55}) == []  # one eval without a better one
    (warning,) = monitors.observe_eval(6, {"eval/rewards/accuracies": 0.6})  # a tie is no improvement
    assert (warning.monitor, warning.step) == ("saturation", 6)
    assert "accuracy 1.000 over the last 16 pairs" in warning.message
    assert "has not passed 0.600 for 2 evals" in warning.message
    assert fired(monitors, [row(7, accuracy=1.0)]) == []  # still saturated: said once
    quiet = HealthMonitors(MonitorConfig(window_pairs=16, saturation_evals=2), has_reference=True)
    fired(quiet, [row(1, accuracy=1.0), row(2, accuracy=0.9)])  # mean 0.95 < 0.98
    for step, accuracy in ((2, 0.6), (4, 0.5), (6, 0.5)):
        assert quiet.observe_eval(step, {"eval/rewards/accuracies": accuracy}) == []


def test_length_exploitation_averages_the_correlation_over_the_window():
    monitors = HealthMonitors(MonitorConfig(window_pairs=24), has_reference=True)
    rows = [row(1, corr=0.9), row(2, corr=0.9), row(3, corr=-0.4), row(4, corr=0.9), row(5, corr=0.9), row(6, corr=0.9)]
    assert fired(monitors, rows) == [("length", 6)]  # steps 3-5 average (0.9 + 0.9 - 0.3) / 3, below 0.5
    assert fired(HealthMonitors(MonitorConfig(window_pairs=8), True), [row(1, corr=None)]) == []  # constant lengths


def test_gradient_norm_fires_when_not_finite_or_far_above_the_median():
    monitors = HealthMonitors(MonitorConfig(grad_norm_spike=10.0), has_reference=True)
    rows = [row(1, grad=1.0), row(2, grad=2.0), row(3, grad=1.5), row(4, grad=14.0), row(5, grad=16.0)]
    # step 4: 14 is not above 10 x median(1, 2, 1.5) = 15; step 5: 16 > 10 x median(1, 2, 1.5, 14) = 17.5? no
    assert fired(monitors, rows) == []
    assert fired(monitors, [row(6, grad=200.0)]) == [("grad_norm", 6)]  # 200 > 10 x median(1, 2, 1.5, 14, 16)
    assert fired(HealthMonitors(MonitorConfig(), True), [row(1, grad=math.inf)]) == [("grad_norm", 1)]


def test_state_round_trips_through_json_so_a_resumed_run_warns_as_the_uninterrupted_one():
    rows = [row(s, ratio=-0.004 * s, margin=0.1 * s, accuracy=1.0, corr=0.7, grad=1.0 + s) for s in range(1, 9)]
    whole = HealthMonitors(MonitorConfig(), has_reference=True)
    expected = fired(whole, rows)
    first = HealthMonitors(MonitorConfig(), has_reference=True)
    got = fired(first, rows[:4])
    resumed = HealthMonitors(MonitorConfig(), has_reference=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert got + fired(resumed, rows[4:]) == expected and len(expected) >= 2


def test_a_disabled_monitor_says_nothing():
    monitors = HealthMonitors(MonitorConfig(enabled=False), has_reference=True)
    assert fired(monitors, [row(1), row(2, ratio=-1.0, margin=5.0, grad=math.nan)]) == []


def test_the_windows_margin_length_correlation_is_pearsons_over_all_its_pairs():
    """Oracle: numpy's float64 corrcoef over the pairs of two micro-batches, one row dropped by weight 0."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (2, 2, 6), generator=generator)  # [micro-batch, chosen/rejected, pair]
    margins = torch.randn(2, 6, generator=generator) + 0.05 * (lengths[:, 0] - lengths[:, 1])
    window = MetricWindow(("rewards/margins",) + HEALTH_STATS)
    weights = [torch.ones(6), torch.tensor([1.0, 1, 1, 0, 1, 1])]
    for i in range(2):
        policy = torch.randn(12, generator=generator)
        stats = {
            "rewards/margins": margins[i],
            **health_stats(policy, policy, torch.cat([lengths[i, 0], lengths[i, 1]]), margins[i]),
        }
        window.add(stats, tokens=1, weight=weights[i])
    keep = torch.cat(weights).bool()
    difference = (lengths[:, 0] - lengths[:, 1]).flatten()[keep].double().numpy()
    expected = np.corrcoef(margins.flatten()[keep].double().numpy(), difference)[0, 1]
    got = margin_length_correlation(window.reduce())
    assert got["rewards/margin_length_corr"] == pytest.approx(expected, abs=1e-9)
    assert not any(name.startswith("moments/") for name in got)
    constant = MetricWindow(("rewards/margins",) + HEALTH_STATS)
    same = torch.full((4,), 10)
    constant.add(
        {"rewards/margins": torch.randn(2), **health_stats(torch.zeros(4), torch.zeros(4), same, torch.randn(2))}, 1
    )
    assert margin_length_correlation(constant.reduce())["rewards/margin_length_corr"] is None


def test_a_run_built_to_memorise_warns_of_saturation(tiny_model_dir, tmp_path):
    """The held-out pairs are the training pairs with chosen and rejected swapped: memorising the
    training pairs can only lower held-out accuracy, so it stalls while train accuracy reaches 1."""
    rows = [json.loads(line) for line in SENTIMENT_TRAIN.read_text().splitlines()[:8]]
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "swapped.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_file.write_text(
        "".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows)
    )
    out = tmp_path / "run"
    train(
        tiny_config(
            tiny_model_dir, out, f"data.train={train_file}", f"data.eval={eval_file}", "train.max_steps=24",
            "train.micro_batch_size=8", "train.eval_every=4", "train.lr=5e-3", "monitor.window_pairs=16",
        )
    )  # fmt: skip
    health = [r for r in read_metrics(out) if r["kind"] == "health"]
    assert "saturation" in [r["monitor"] for r in health], health
    saturated = next(r for r in health if r["monitor"] == "saturation")
    assert saturated["rewards/accuracies"] >= 0.98 and saturated["message"].startswith("saturation at step")


def test_a_low_lr_run_warns_of_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, "train.max_steps=12", "train.micro_batch_size=8", "train.lr=1e-4"))
    rows = read_metrics(out)
    assert [r for r in rows if r["kind"] == "health"] == []
    assert "dpo-lora: warning" not in capsys.readouterr().err
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(abs(r["logratios/chosen_per_token"]) < 0.01 for r in train_rows)
