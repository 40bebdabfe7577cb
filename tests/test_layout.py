"""The batch layout follows what the model's attention kernel can do."""

from __future__ import annotations

import pytest

from dpo_lora.layout import batch_layout

from .test_trainer import tiny_config


@pytest.mark.parametrize(
    ("kernel", "asked_pack", "share", "pack", "notice"),
    [
        ("sdpa", False, True, False, None),
        ("sdpa", True, True, False, "train.pack_sequences off"),  # a dense mask over a packed row: not worth it
        ("flash_attention_2", True, False, True, "train.share_prompt off"),  # no 4D mask, but varlen packing
    ],
)
def test_the_batch_layout_follows_what_the_attention_kernel_can_do(tmp_path, kernel, asked_pack, share, pack, notice):
    from transformers import LlamaConfig

    model_config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    model_config._attn_implementation = kernel
    model = type("Model", (), {"config": model_config})()
    config = tiny_config("unused", tmp_path, "train.share_prompt=true", f"train.pack_sequences={asked_pack}")
    collate, notices = batch_layout(config, model, pad_token_id=0)
    assert collate.keywords == {"pad_token_id": 0, "share_prompt": share, "pack": pack}
    assert any(notice in line for line in notices) if notice else notices == []
