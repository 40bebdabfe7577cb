"""End to end on the real SmolLM2-135M-Instruct: NF4 + LoRA + DeepSpeed ZeRO-2 on the CPU,
one process and two ranks through DeepSpeed's own launcher, and the run's GGUF export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dpo_lora.commands.fetch import fetch_default_model
from dpo_lora.core.config import load_config

from ..conftest import REPO, SENTIMENT_EVAL, SENTIMENT_TRAIN, free_port

pytestmark = pytest.mark.slow
MODEL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
# Few, short steps at a high learning rate on the templated test data (learnt in a few steps):
# enough to show learning on held-out pairs in CI time.
COMMON = [
    f"data.train={SENTIMENT_TRAIN}",
    f"data.eval={SENTIMENT_EVAL}",
    "data.max_length=96",
    "data.max_prompt_length=72",
    "train.lr=1e-3",
    "train.warmup_ratio=0",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def smollm2() -> str:
    return str(fetch_default_model(MODEL_DIR))


def rows(output_dir) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval/loss" in r]


def run(command: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_single_process_trains_and_the_adapter_reloads_with_peft(smollm2, tmp_path):
    out = tmp_path / "run"
    run(
        [sys.executable, "-m", "dpo_lora", "train", "configs/demo.yaml", f"model.path={smollm2}", f"output_dir={out}",
         "train.max_steps=6", "train.micro_batch_size=8", *COMMON]
    )  # fmt: skip
    train_rows, eval_rows = rows(out)
    assert train_rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.05, [r["loss"] for r in train_rows]
    before, after = eval_rows
    assert before["eval/rewards/accuracies"] == 0.0 and after["eval/rewards/accuracies"] > 0.6
    assert after["eval/rewards/margins"] > 0

    # The saved adapter, loaded by plain PEFT on a freshly quantized base, scores the eval set
    # exactly as the trainer did at the end of training.
    from torch.utils.data import DataLoader

    from dpo_lora.data.layout import collate_pairs
    from dpo_lora.data.prepare import prepare_splits
    from dpo_lora.model.load import load_tokenizer
    from dpo_lora.train.step import preference_step
    from dpo_lora.train.trained import load_policy

    config = load_config(out / "config.yaml")
    tokenizer = load_tokenizer(config.model)
    _, eval_set = prepare_splits(config.data, tokenizer, config.train.seed)
    model = load_policy(out / "adapter", config.model, torch.device("cpu"))
    chosen, pairs = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(eval_set, batch_size=16, collate_fn=lambda f: collate_pairs(f, tokenizer.pad_token_id)):
            _, stats = preference_step(model, batch, config.dpo)
            chosen += stats["logps/chosen"].sum().item()
            pairs += len(stats["loss"])
    assert chosen / pairs == pytest.approx(after["eval/logps/chosen"], rel=1e-4)

    # The run as one q8_0 GGUF for llama.cpp/Ollama: transformers loads it (tokenizer and chat template
    # included) with the log-probs of the merge as stored (and within 1 nat of the float32 merge's).
    from dpo_lora.commands.export import export_model
    from dpo_lora.model.gguf_export import GGUF_TOLERANCE

    report = export_model(str(out), out=str(tmp_path / "gguf"), format="gguf", gguf_type="q8_0")
    assert report["gguf_tokenizer_matches"] is True and report["tensors"] == 272  # SmolLM2: tied head, 30 layers
    assert report["max_logp_diff_gguf_vs_stored"] <= GGUF_TOLERANCE and report["max_logp_diff_gguf_vs_merged"] < 1.0
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith(f"FROM ./{report['gguf_file']}\n")


@pytest.mark.skipif(
    shutil.which("deepspeed") is None and not (REPO / ".venv/bin/deepspeed").exists(), reason="no deepspeed launcher"
)
def test_two_ranks_through_the_deepspeed_launcher(smollm2, tmp_path):
    out = tmp_path / "run"
    launcher = shutil.which("deepspeed") or str(REPO / ".venv/bin/deepspeed")
    result = run(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dpo_lora", "train", "configs/demo.yaml",
         f"model.path={smollm2}", f"output_dir={out}", "train.max_steps=6", "train.micro_batch_size=4", *COMMON],
        env_extra={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    train_rows, eval_rows = rows(out)
    assert len(train_rows) == 6, "rank 0 alone writes one row per step"
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.05, [r["loss"] for r in train_rows]
    assert eval_rows[-1]["eval/pairs"] == 64, "eval covers the held-out set once across both ranks"
    assert eval_rows[-1]["eval/rewards/accuracies"] > 0.6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert result.stdout.count("held-out metric") == 1, "only rank 0 prints the summary"
