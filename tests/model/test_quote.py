"""The quote: its FLOP count against the model's own weights, its step and token counts against
what a run then trains, the efficiency a finished run's rows give back, and `plan --time`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from dpo_lora.model import quote as quotes
from dpo_lora.model.memory_plan import data_token_counts
from dpo_lora.train.loop import train

from ..conftest import SENTIMENT_TRAIN
from ..train.test_loop import read_metrics, tiny_config


@pytest.fixture(autouse=True)
def rate_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(quotes.RATE_CACHE_VARIABLE, str(tmp_path / "cache"))


def test_the_layers_flops_are_two_per_weight_of_the_models_own_linear_layers(tiny_model_dir, tmp_path):
    """Oracle: the decoder layers' 2-D weights counted on the real (tiny) model, not from its config."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(tiny_model_dir, tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    layers_flops, head_flops = quotes._flops_per_token(config)
    assert (layers_flops, head_flops) == (2 * weights, 2 * head)

    # A step: reference, policy forward, backward (+ a recompute with checkpointing); the head
    # at completion positions only.
    assert quotes.step_flops_per_pair(config, 100, 40) == 100 * 3 * layers_flops + 40 * 3 * head_flops
    checkpointed = replace(config, model=replace(config.model, gradient_checkpointing=True))
    assert quotes.step_flops_per_pair(checkpointed, 100, 40) == 100 * 4 * layers_flops + 40 * 3 * head_flops
    policy_only = replace(config, dpo=replace(config.dpo, loss="simpo"))
    assert quotes.step_flops_per_pair(policy_only, 100, 40) == 100 * 2 * layers_flops + 40 * 2 * head_flops


def test_steps_and_tokens_are_what_the_run_then_trains(tiny_model_dir, tmp_path):
    """An epoch of 32 pairs in micro-batches of 8: every pair once, so the quote's token count is
    exactly the sum of the run's rows."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(SENTIMENT_TRAIN.read_text().splitlines(keepends=True)[:32]))
    config = tiny_config(
        tiny_model_dir, tmp_path / "run", f"data.train={data}", "data.eval=null", "train.epochs=1",
        "train.micro_batch_size=8",
    )  # fmt: skip
    quoted = quotes.quote(config, 2**40)
    assert quoted["total_steps"] == 4
    train(config)
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert quoted["trained_tokens"] == sum(r["tokens"] for r in rows)


def test_a_finished_runs_rows_give_back_the_efficiency_they_were_made_at(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run")
    rate, share = 1e11, 0.3
    rows = []
    for tokens_per_pair in (90.0, 90.0, 120.0, 60.0):
        flops = quotes.step_flops_per_pair(config, tokens_per_pair, tokens_per_pair / 2)
        rows.append({"pairs": 8, "tokens": 8 * tokens_per_pair, "pairs_per_s": share * rate / flops,
                     "lengths/chosen": tokens_per_pair / 4, "lengths/rejected": tokens_per_pair / 4})  # fmt: skip
    rows[0]["pairs_per_s"] /= 10  # the first row's warm-up is left out
    assert quotes.achieved_efficiency(config, rows, rate) == pytest.approx(share)
    assert quotes.achieved_efficiency(config, rows[:1], rate) is None


def test_the_time_is_the_work_over_the_rate_times_the_share_plus_startup(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(quotes, "measure_matmul_rate", lambda device, dtype: 2e9)
    config = tiny_config(tiny_model_dir, tmp_path / "run", "train.max_steps=10", "train.micro_batch_size=4")
    quoted = quotes.quote(config, 2**40, efficiency=0.5)
    counts = data_token_counts(config)
    held_out = data_token_counts(replace(config, data=replace(config.data, train=config.data.eval)))
    work = 40 * quotes.step_flops_per_pair(config, counts.mean_tokens, counts.mean_completion)
    # Evals: before training one forward (the policy is the reference), after the last step two.
    evals = held_out.pairs * held_out.mean_tokens * 3 * quotes._flops_per_token(config)[0]
    expected = quotes.STARTUP_SECONDS["cpu"] + work / 1e9 + evals / (1e9 * quotes.EVAL_SPEEDUP["cpu"])
    assert quoted["estimated_seconds"] == pytest.approx(expected, abs=0.1)
    every_3 = replace(config, train=replace(config.train, eval_every=3))  # steps 3, 6, 9 and the last, 10
    assert quotes.run_counts(every_3, 1)["evals"] == (1, 4)
    assert quoted["matmul_flops_per_s"] == 2e9
    cache = json.loads((tmp_path / "cache" / "matmul_rates.json").read_text())
    assert list(cache.values()) == [2e9]  # measured once, then read
    monkeypatch.setattr(quotes, "measure_matmul_rate", lambda device, dtype: pytest.fail("measured twice"))
    assert quotes.quote(config, 2**40, efficiency=0.5)["estimated_seconds"] == quoted["estimated_seconds"]


def test_the_cached_matmul_rate_is_a_plausible_float_rate():
    rate = quotes.measure_matmul_rate(torch.device("cpu"), torch.float32)
    assert 1e8 < rate < 1e14


def test_plan_time_prints_steps_tokens_and_time(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from dpo_lora.cli import main

    monkeypatch.setattr(quotes, "measure_matmul_rate", lambda device, dtype: 2e9)
    args = [f"model.path={tiny_model_dir}", "model.dtype=float32", f"data.train={SENTIMENT_TRAIN}"]
    assert main(["plan", *args, "train.max_steps=5", "--time"]) == 0
    out = capsys.readouterr().out
    assert "time on cpu" in out and "5 steps" in out and "device-hours" in out
    assert main(["plan", *args, "train.max_steps=5", "--time", "--json"]) == 0
    quoted = json.loads(capsys.readouterr().out)
    assert quoted["total_steps"] == 5 and quoted["estimated_seconds"] > quotes.STARTUP_SECONDS["cpu"]
