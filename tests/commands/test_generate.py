"""`dpo-lora generate`: policy and reference samples side by side, rewards, win rate, KL."""

from __future__ import annotations

import json
import math

import pytest

from dpo_lora.commands.generate import generate_run, load_reward
from dpo_lora.core.errors import UserError

from .test_eval import trained_run  # noqa: F401  (module fixture: a tiny trained run)


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
        reward="tests.commands.test_generate:length_reward",
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
    shown = [row["prompt_text"] for row in result["samples"]]
    assert shown == ["Continue this movie review with one sentence", "The plot was"], "people read their own text"


def test_bad_reward_and_prompts_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--reward nowhere:fn: cannot import it"):
        load_reward("nowhere:fn")
    with pytest.raises(UserError, match="--prompts: file not found"):
        generate_run("unused", str(tmp_path / "none.txt"))


NOISE = ("Setting accelerator to CPU", "Loading weights", "is_gradient_checkpointing", "gemm_4bit_forward")


def test_cli_generate_shows_samples_side_by_side_and_eval_and_export_are_quiet(trained_run, tmp_path):  # noqa: F811
    import subprocess
    import sys

    from ..conftest import REPO

    out, _ = trained_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Continue this movie review with one sentence\nThe plot was\n")
    generate = [sys.executable, "-m", "dpo_lora", "generate", str(out), "--prompts", str(prompts), "--n", "2"]
    generate += [
        "--max-new-tokens",
        "12",
        "--reward",
        "tests.commands.test_generate:length_reward",
        "--out",
        str(tmp_path / "g.json"),
    ]
    evaluate = [sys.executable, "-m", "dpo_lora", "eval", str(out), "--out", str(tmp_path / "e.json")]
    export = [sys.executable, "-m", "dpo_lora", "export", str(out), "--out", str(tmp_path / "merged")]
    shown = ""
    for command in (generate, evaluate, export):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        for noise in NOISE:
            assert noise not in result.stderr + result.stdout, (command[4], noise)
        shown = shown or result.stdout
    samples = json.loads((tmp_path / "g.json").read_text())["samples"]
    assert shown.count("reference (reward ") == 2 and shown.count("| policy (reward ") == 2
    assert all(len(line) <= 100 for line in shown.splitlines())
    assert "prompt: Continue this movie review with one sentence" in shown and "<|im_start|>" not in shown
    first_policy = " ".join(samples[0]["policy"][0].split())
    right_column = " ".join(
        line.split(" | ", 1)[1] for line in shown.splitlines()[3:] if " | " in line and line[0] != "-"
    )
    assert first_policy.split()[0] in right_column, "the policy's own sample is in the policy column"


def test_left_padded_batch_scores_each_sample_as_alone(tiny_tokenizer):
    """completion_logps of a left-padded batch equals scoring each prompt's samples unpadded."""
    import torch

    from dpo_lora.commands.generate import completion_logps

    from ..conftest import build_tiny_model

    model = build_tiny_model(len(tiny_tokenizer)).eval()
    eos = tiny_tokenizer.eos_token_id
    tiny_tokenizer.padding_side = "left"
    prompts = ["The plot was", "Continue this movie review with one sentence about the acting"]
    batch = tiny_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    sequences = model.generate(**batch, do_sample=True, max_new_tokens=6, num_return_sequences=2, pad_token_id=eos)
    sequences[0, -2] = eos  # one sample ends early: its tail is padding, scored up to the EOS only
    batched = completion_logps(model, batch["attention_mask"], sequences, eos)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(prompts):
        alone = tiny_tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        real = int(batch["attention_mask"][i].sum())
        own = torch.cat([sequences[2 * i : 2 * i + 2, width - real : width], sequences[2 * i : 2 * i + 2, width:]], 1)
        expected = completion_logps(model, alone["attention_mask"], own, eos)
        torch.testing.assert_close(batched[2 * i : 2 * i + 2], expected, rtol=1e-5, atol=1e-5)


def test_scoring_only_the_generated_positions_equals_scoring_every_position(tiny_tokenizer):
    """completion_logps keeps logits for the generated tail only; the full-logits sum is the oracle."""
    import torch

    from dpo_lora.commands.generate import completion_logps
    from dpo_lora.model.logprobs import IGNORE_INDEX, sequence_logps

    from ..conftest import build_tiny_model

    model = build_tiny_model(len(tiny_tokenizer)).eval()
    eos = tiny_tokenizer.eos_token_id
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(["The plot was", "Continue this movie review"], return_tensors="pt", padding=True,
                           add_special_tokens=False)  # fmt: skip
    torch.manual_seed(1)
    sequences = model.generate(**batch, do_sample=True, max_new_tokens=7, num_return_sequences=1, pad_token_id=eos)
    width = batch["input_ids"].shape[1]
    attention = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, width:])], dim=1)
    labels = sequences.clone()
    labels[:, :width] = IGNORE_INDEX
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=sequences, attention_mask=attention, position_ids=positions).logits
    expected = sequence_logps(full.double(), labels)[0].double()
    assert not (sequences[:, width:] == eos).any(), "the oracle above assumes no early EOS in these samples"
    scored = completion_logps(model, batch["attention_mask"], sequences, eos).double()
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("reference,dora", [("base", False), ("init_adapter", False), ("base", True), ("init_adapter", True)])  # fmt: skip
def test_one_mixed_generate_call_equals_separate_policy_and_reference_calls(tiny_tokenizer, reference, dora):
    """sample_both runs policy and reference rows in one batch (a PEFT adapter per row; with DoRA,
    which PEFT refuses to mix, one call per side); greedy decoding makes the oracle exact: the
    policy alone, then the reference alone."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dpo_lora.commands.generate import sample_both
    from dpo_lora.model.load import REFERENCE_ADAPTER, reference_mode

    from ..conftest import build_tiny_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
    model = get_peft_model(build_tiny_model(len(tiny_tokenizer)), lora)
    if reference == "init_adapter":
        model.add_adapter(REFERENCE_ADAPTER, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        init_lora_weights=False, use_dora=dora))  # fmt: skip
        model.set_adapter("default")
    model.eval()
    eos = tiny_tokenizer.eos_token_id
    tiny_tokenizer.padding_side = "left"
    prompts = tiny_tokenizer(["The plot was", "Continue this movie review with one sentence"], return_tensors="pt",
                             padding=True, add_special_tokens=False)  # fmt: skip
    greedy = dict(do_sample=False, max_new_tokens=6, pad_token_id=eos)
    policy, reference_samples = sample_both(model, dict(prompts), 2, **greedy)
    rows = {key: value.repeat_interleave(2, dim=0) for key, value in prompts.items()}
    with torch.no_grad():
        alone = model.generate(**rows, **greedy)
        with reference_mode(model):
            reference_alone = model.generate(**rows, **greedy)
    assert not torch.equal(alone, reference_alone), "policy and reference differ: the comparison can fail"
    assert torch.equal(policy, alone) and torch.equal(reference_samples, reference_alone)
