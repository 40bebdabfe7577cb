"""What fits where (`dpo_lora.model.cluster`) and the ZeRO-3 part of the plan, on a Llama-3-70B
config.json (no weights): NF4, LoRA r16 on every linear layer, 1 pair x 1024 tokens, bfloat16,
gradient checkpointing, GPUs of 24 GiB. That ZeRO-3 plans what each rank really holds is
tests/train/test_parity.py (two CPU ranks)."""

from __future__ import annotations

import json

import pytest

from dpo_lora.cli import main
from dpo_lora.core.config import load_config
from dpo_lora.model.memory_plan import plan
from dpo_lora.model.quote import memory_quote
from dpo_lora.model.weight_plan import GATHERED_LABEL

from ..conftest import REPO

GIB = 2**30
FOUR_BIT = "4-bit weights + absmax"
UNQUANTIZED = "unquantized weights (embeddings, head, norms)"


@pytest.fixture(scope="module")
def llama3_70b(tmp_path_factory) -> list[str]:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama3-70b")
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                tie_word_embeddings=False).save_pretrained(folder)  # fmt: skip
    return [f"model.path={folder}", "model.quantization=nf4", "model.dtype=bfloat16",
            "model.gradient_checkpointing=true", "lora.r=16", "lora.target_modules=all-linear",
            "data.max_length=1024", "train.micro_batch_size=1"]  # fmt: skip


def config_with(overrides: list[str], zero: str):
    return load_config(None, [*overrides, f"deepspeed={REPO / 'deepspeed_configs' / zero}"])


def test_70b_fits_eight_24gib_gpus_under_zero3_with_an_eighth_of_the_base_each(llama3_70b, capsys):
    whole = plan(config_with(llama3_70b, "zero2.json")).components  # one rank holds the whole base
    args = ["plan", *llama3_70b, f"deepspeed={REPO / 'deepspeed_configs' / 'zero3.json'}", "--gpus", "8"]
    assert main([*args, "--gpu-memory", "24GiB", "--json"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert eight["fits"] is True and eight["per_rank_bytes"] <= 24 * GIB
    # The packed weights and their absmax split eight ways; the nested statistics stay whole (tiny).
    assert eight["components"][FOUR_BIT] == pytest.approx(whole[FOUR_BIT] / 8, rel=0.01)
    assert eight["components"][UNQUANTIZED] == pytest.approx(whole[UNQUANTIZED] / 8, rel=0.01)
    # One bf16 head or embedding (128256 x 8192; all bf16 on a GPU) is gathered whole, plus the reuse window
    # (stage3_max_reuse_distance: 50M elements in the shipped configs, which prefetch nothing).
    gathered = eight["components"][GATHERED_LABEL]
    assert gathered == 128256 * 8192 * 2 + 50_000_000
    assert eight["host_bytes_per_rank"] == 0
    # The cluster table: the cheapest shipped configuration that fits each GPU count.
    table = {row["gpus"]: row for row in eight["by_gpus"]}
    assert sorted(table) == [1, 2, 4, 8] and all(row["fits"] for row in table.values())
    assert table[8]["deepspeed"] == "deepspeed_configs/zero3.json"
    assert table[1]["deepspeed"] == "deepspeed_configs/zero3_offload.json" and table[1]["host_bytes_per_rank"] > 0
    assert main([*args, "--gpu-memory", "24GiB"]) == 0
    printed = capsys.readouterr().out
    assert "on GPUs of 24 GiB" in printed and "8 GPUs  deepspeed_configs/zero3.json" in printed


def test_70b_fits_two_24gib_gpus_with_its_parameters_on_the_host(llama3_70b):
    config = config_with(llama3_70b, "zero3_offload.json")
    _, planned, quoted = memory_quote(config, 24 * GIB, world_size=2)
    assert quoted["fits"] is True
    whole = plan(config_with(llama3_70b, "zero2.json")).components
    host = planned.host
    # Half the packed weights (with their absmax) and half the float32 embeddings/head per rank on
    # the host; the nested absmax and codebooks stay on the device (they are not parameters).
    assert host["4-bit weights + absmax, ZeRO-3 partition"] + planned.components[FOUR_BIT] == pytest.approx(
        whole[FOUR_BIT] / 2, rel=0.01
    )
    assert planned.components[FOUR_BIT] < 0.01 * whole[FOUR_BIT]
    assert host[f"{UNQUANTIZED}, ZeRO-3 partition"] == pytest.approx(whole[UNQUANTIZED] / 2, rel=0.01)
    assert quoted["host_bytes_per_rank"] == planned.host_bytes > 0.5 * (whole[FOUR_BIT] + whole[UNQUANTIZED]) / 2


def test_70b_on_one_24gib_gpu_is_told_the_smallest_change_that_fits(llama3_70b):
    config = config_with(llama3_70b, "zero2.json")
    _, _, quoted = memory_quote(config, 24 * GIB)
    assert quoted["fits"] is False
    # Already NF4 with checkpointing and a micro-batch of 1: the parameters must leave the GPU.
    assert quoted["recommendation"].startswith("deepspeed=deepspeed_configs/zero3_offload.json")
    assert "host memory per rank" in quoted["recommendation"] and "quantization" not in quoted["recommendation"]
    # Already offloading, on 8 GiB: never the configuration it runs; more GPUs do not help either
    # (the gathered head alone is 3.9 GiB and the activations do not shard), a shorter length does.
    offloaded = config_with(llama3_70b, "zero3_offload.json")
    _, _, small = memory_quote(offloaded, 8 * GIB)
    assert small["fits"] is False and "zero3_offload" not in small["recommendation"]
    assert small["recommendation"].startswith("data.max_length=")
