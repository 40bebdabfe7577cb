"""ZeRO-3 loading of the quantized base a tensor at a time (`dpo_lora.model.zero3_loading`).

The oracle is `from_pretrained` itself: on every rank the base is also loaded whole, and each
gathered parameter (packed 4-bit or int8 data, norms, embeddings) and quantization statistic must
equal it bit for bit, with equal logits. Training under ZeRO-3 against ZeRO-2 is
`tests/train/test_parity.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ..conftest import REPO, VENV_BIN, build_tiny_tokenizer, venv_env

CASES = ["nf4:bfloat16", "fp4:float32", "int8:float32", "none:float32"]


def _rows(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("ZERO3_RANK ")]


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """A tiny Llama whose output head is its input embedding (as SmolLM2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    folder = tmp_path_factory.mktemp("tied-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_one_rank_loads_exactly_what_from_pretrained_loads(tiny_model_dir, tied_model_dir):
    cases = [f"{tied_model_dir}:{case}" for case in CASES] + [f"{tiny_model_dir}:nf4:float32"]
    command = [sys.executable, "-m", "tests.model.zero3_rank", *cases]
    rows = _rows(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=venv_env()))
    assert [row["case"] for row in rows] == cases
    for row in rows:
        assert row["mismatched"] == [] and row["max_logit_diff"] == 0.0, row
        assert row["tied"] == row["expected_tied"] == row["case"].startswith(str(tied_model_dir)), row
        assert row["held"] == row["whole"] > 0, row  # one rank holds everything
        assert (row["quant_stats"] > 0) == (":none:" not in row["case"]), row


def test_two_ranks_each_hold_half_of_the_base_and_gather_it_exactly(tied_model_dir):
    cases = [f"{tied_model_dir}:nf4:bfloat16", f"{tied_model_dir}:int8:float32"]
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29641", "--module",
               "tests.model.zero3_rank", *cases]  # fmt: skip
    rows = _rows(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=venv_env()))
    assert sorted((row["case"], row["rank"]) for row in rows) == sorted(
        (case, rank) for case in cases for rank in (0, 1)
    )
    for row in rows:
        assert row["mismatched"] == [] and row["max_logit_diff"] == 0.0 and row["tied"], row
        # Each tensor is split in two, padded to a multiple of the world size: half, give or take
        # one element per tensor.
        assert row["held"] == pytest.approx(row["whole"] / 2, rel=0.01), row


def test_a_checkpoint_with_other_tensor_names_falls_back_to_the_whole_load(tiny_model_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from dpo_lora.core.schema import ModelConfig
    from dpo_lora.model.zero3_loading import load_partitioned

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.norm.weight"] = tensors.pop("model.norm.weight")  # a name transformers would map
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = ModelConfig(path=str(folder), quantization="nf4", dtype="float32")
    assert load_partitioned(config, torch.device("cpu"), {"zero_optimization": {"stage": 3}}) is None
    assert "model.norm.weight is not in the checkpoint" in capsys.readouterr().err
