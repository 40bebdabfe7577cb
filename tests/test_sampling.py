"""`dpo-lora generate`: policy and reference samples side by side, rewards, win rate, KL."""

from __future__ import annotations

import json
import math

import pytest

from dpo_lora.errors import UserError
from dpo_lora.sampling import generate_run, load_reward

from .test_report import trained_run  # noqa: F401  (module fixture: a tiny trained run)


def length_reward(text: str) -> float:
    return float(len(text))


def test_generate_writes_samples_rewards_and_kl(trained_run, tmp_path):  # noqa: F811
    out, _ = trained_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "Continue this movie review with one sentence"}]})
        + "\n"
        + json.dumps({"prompt": "The plot was"})
        + "\n"
    )
    result = generate_run(
        str(out),
        str(prompts),
        n=3,
        max_new_tokens=8,
        reward="tests.test_sampling:length_reward",
        out=str(tmp_path / "g.json"),
    )
    summary = result["summary"]
    assert summary["prompts"] == 2 and summary["samples_per_prompt"] == 3
    assert math.isfinite(summary["kl_estimate"])
    assert 0.0 <= summary["policy_win_rate"] <= 1.0
    for row in result["samples"]:
        assert len(row["policy"]) == len(row["reference"]) == 3
        assert row["policy_rewards"] == [float(len(t)) for t in row["policy"]]
    assert json.loads((tmp_path / "g.json").read_text()) == result
    assert result["samples"][0]["prompt"].endswith("<|im_start|>assistant\n"), "chat prompts use the template"


def test_bad_reward_and_prompts_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--reward nowhere:fn: cannot import it"):
        load_reward("nowhere:fn")
    with pytest.raises(UserError, match="--prompts: file not found"):
        generate_run("unused", str(tmp_path / "none.txt"))
