"""DeepSpeed JSON filling: "auto" comes from the YAML, contradictions are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_lora.core.config import load_config
from dpo_lora.core.dsconfig import fill_deepspeed_config
from dpo_lora.core.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "deepspeed_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_json_fills_completely(path):
    config = load_config(None, [f"deepspeed={path}", "train.micro_batch_size=3", "train.grad_accum=5"])
    filled = fill_deepspeed_config(config, world_size=2)
    assert filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_accumulation_steps"] == 5
    assert filled["train_batch_size"] == 30
    # bf16 (the default model.dtype) computes the base in bf16 but keeps the adapter in float32:
    # DeepSpeed's bf16 mode, which would round the adapter and its gradients, stays off.
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(filled)


@pytest.mark.parametrize(("name", "stage"), [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
def test_dora_runs_on_every_zero_stage(name, stage):
    """DoRA under ZeRO-3 gathers each base weight in its layer (tests/train/test_parity.py trains it)."""
    config = load_config(None, [f"deepspeed={REPO / 'deepspeed_configs' / name}", "lora.dora=true"])
    assert fill_deepspeed_config(config, world_size=1)["zero_optimization"]["stage"] == stage


def write(tmp_path, content: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_contradiction_with_yaml_names_the_key(tmp_path):
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}})
    config = load_config(None, [f"deepspeed={path}", "train.micro_batch_size=4"])
    with pytest.raises(UserError, match="'train_micro_batch_size_per_gpu' is 8 but the config gives 4"):
        fill_deepspeed_config(config, world_size=1)


def test_agreeing_explicit_values_are_kept(tmp_path):
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0})
    config = load_config(None, [f"deepspeed={path}", "train.micro_batch_size=4", "model.dtype=float32"])
    filled = fill_deepspeed_config(config, world_size=1)
    assert filled["bf16"]["enabled"] is False and filled["train_batch_size"] == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "'zero_optimization.reduce_bucket_size' is \"auto\""),
    ],
)
def test_unfillable_content_is_refused(tmp_path, content, message):
    config = load_config(None, [f"deepspeed={write(tmp_path, content)}"])
    with pytest.raises(UserError, match=message):
        fill_deepspeed_config(config, world_size=1)


def test_missing_or_broken_json_is_a_user_error(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    for path, message in ((tmp_path / "none.json", "file not found"), (tmp_path / "broken.json", "not valid JSON")):
        with pytest.raises(UserError, match=message):
            fill_deepspeed_config(load_config(None, [f"deepspeed={path}"]), world_size=1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_reduce_bucket_is_sized_to_the_adapter_never_larger_than_asked(stage):
    from dpo_lora.core.dsconfig import size_buckets, zero_config

    shipped = zero_config(stage)  # 50M elements
    assert size_buckets(shipped, 4_900_000)["zero_optimization"]["reduce_bucket_size"] == 4_900_000
    assert size_buckets(shipped, 80_000_000)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert shipped["zero_optimization"]["reduce_bucket_size"] == 50_000_000  # not changed in place
    unset = {"zero_optimization": {"stage": stage}}  # DeepSpeed's own default: 500M elements
    assert size_buckets(unset, 600_000_000)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert size_buckets({"zero_optimization": {"stage": 0}}, 10) == {"zero_optimization": {"stage": 0}}


def test_contiguous_gradients_auto_is_off_on_one_rank_and_on_for_several_or_with_offload():
    """ZeRO-1/2's shipped "auto": one rank reduces nothing, so no bucket copy of every gradient;
    several ranks, or optimizer offload (DeepSpeed's rule), keep it. A value the JSON gives is kept."""
    from dpo_lora.core.dsconfig import contiguous_gradients

    filled = {}
    for name in ("zero1", "zero2", "zero2_offload"):
        config = load_config(None, [f"deepspeed={REPO / 'deepspeed_configs' / name}.json"])
        assert json.loads((REPO / "deepspeed_configs" / f"{name}.json").read_text())["zero_optimization"][
            "contiguous_gradients"] == "auto"  # fmt: skip
        for world_size in (1, 2):
            zero = fill_deepspeed_config(config, world_size)["zero_optimization"]
            filled[name, world_size] = zero["contiguous_gradients"]
    assert filled == {("zero1", 1): False, ("zero1", 2): True, ("zero2", 1): False, ("zero2", 2): True,
                      ("zero2_offload", 1): True, ("zero2_offload", 2): True}  # fmt: skip
    assert contiguous_gradients(True, False, 1) and not contiguous_gradients(False, False, 4)
    assert contiguous_gradients(False, True, 1)  # offload


def test_the_plan_counts_the_gradient_bucket_only_where_gradients_are_contiguous():
    from dpo_lora.core.dsconfig import zero_config
    from dpo_lora.model.weight_plan import ZeroSettings, optimizer_components

    numel = 1_000_000
    zero2 = ZeroSettings.of(zero_config(2)["zero_optimization"])
    assert optimizer_components(numel, zero2, 1)[0]["LoRA gradients"] == 4 * numel  # no bucket on one rank
    assert optimizer_components(numel, zero2, 2)[0]["LoRA gradients"] == 4 * numel // 2 + 4 * numel
    offload = ZeroSettings.of(zero_config(2, offload=True)["zero_optimization"])
    assert optimizer_components(numel, offload, 1)[0]["LoRA gradients"] == 2 * 4 * numel
