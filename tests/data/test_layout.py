"""Batch layouts: the choice follows what the attention kernel can do, every layout scores exactly
the completion tokens, and the shared-prompt and packed layouts compute what the plain one does
(mask, positions, values, LoRA gradients)."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_lora.data.layout import (
    CHOSEN,
    HOST,
    PAD,
    PROMPT,
    REJECTED,
    attention_bias,
    batch_layout,
    collate_pairs,
    collate_shared,
    unsupported_reason,
)  # fmt: skip
from dpo_lora.train.step import concatenated_logps

from ..train.test_loop import tiny_config


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
    # the mask path; the split-attention switch of sdpa models: tests/model/test_shared_attention.py
    config = tiny_config("unused", tmp_path, "train.share_prompt=true", f"train.pack_sequences={asked_pack}",
                         "train.shared_prompt_attention=mask")  # fmt: skip
    collate, notices = batch_layout(config, model, pad_token_id=0)
    assert collate.keywords == {"pad_token_id": 0, "share_prompt": share, "pack": pack, "pad_to_multiple_of": 0}
    assert any(notice in line for line in notices) if notice else notices == []


def random_pairs(count: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(low, high))]

    return [{"prompt_ids": ids(1, 9), "chosen_ids": ids(1, 8), "rejected_ids": ids(1, 8)} for _ in range(count)]


def test_layout_positions_branches_and_scored_tokens():
    features = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5, 6, 7], "row_index": 4},
        {"prompt_ids": [8], "chosen_ids": [9], "rejected_ids": [10], "row_index": 2},
    ]
    batch = collate_shared(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 0, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 2, 3, 4]  # rejected restarts after the prompt
    assert batch["position_ids"][1, :3].tolist() == [0, 1, 1]
    P, C, R, X = PROMPT, CHOSEN, REJECTED, PAD
    assert batch["branch"].tolist() == [[P, P, C, C, R, R, R], [P, C, R, X, X, X, X]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    # chosen 3,4 from positions 1,2; 9 from 7 (row 1 starts at 7); rejected 5 from the last prompt
    # token (1), then 6,7 from 4,5; 10 from the prompt's 7.
    assert batch["score_target"].tolist() == [3, 4, 9, 5, 6, 7, 10]
    assert batch["score_index"].tolist() == [1, 2, 7, 1, 4, 5, 7]
    assert batch["completion_lengths"].tolist() == [2, 1, 3, 1]
    assert batch["row_index"].tolist() == [4, 2]


def unshared_view(prompt: int, chosen: int, rejected: int) -> list[list[tuple[str, int]]]:
    """For each shared position, the (sequence, position) it stands for in the unshared layout."""
    views = [[("chosen", t), ("rejected", t)] for t in range(prompt)]
    views += [[("chosen", prompt + t)] for t in range(chosen)]
    views += [[("rejected", prompt + t)] for t in range(rejected)]
    return views


def test_mask_lets_a_token_see_exactly_what_it_sees_in_its_unshared_sequence():
    features = [{"prompt_ids": [1] * 3, "chosen_ids": [2] * 2, "rejected_ids": [3] * 4}, {"prompt_ids": [1] * 2, "chosen_ids": [2], "rejected_ids": [3]}]  # fmt: skip
    batch = collate_shared(features, pad_token_id=0)
    allowed = attention_bias(batch["branch"], torch.float32)[:, 0] == 0
    for row, f in enumerate(features):
        views = unshared_view(len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"]))
        for q, q_views in enumerate(views):
            for k, k_views in enumerate(views):
                # k is visible to q iff, in some unshared sequence holding both, k comes no later.
                expected = any(sq == sk and pk <= pq for sq, pq in q_views for sk, pk in k_views)
                assert bool(allowed[row, q, k]) == expected, (row, q, k)
            # the position id is q's position in its unshared sequence
            assert int(batch["position_ids"][row, q]) == q_views[0][1]
        for q in range(len(views), allowed.shape[1]):  # padding: itself only, never an empty row
            assert allowed[row, q].nonzero().flatten().tolist() == [q]


def lora_model(tiny_model_dir, attn: str, dtype: str = "float32"):
    from dpo_lora.core.schema import LoraConfig, ModelConfig
    from dpo_lora.model.load import attach_adapter, load_base

    torch.manual_seed(0)
    config = ModelConfig(path=str(tiny_model_dir), quantization="nf4", dtype=dtype, attn_implementation=attn)
    model = attach_adapter(load_base(config, torch.device("cpu")), LoraConfig(dropout=0.0))
    for name, p in model.named_parameters():  # a trained-looking adapter, so every path carries signal
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def logps_and_grads(model, batch):
    model.zero_grad()
    logps, lengths = concatenated_logps(model, batch)
    (logps * torch.linspace(-1, 1, logps.shape[0])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), lengths, grads


@pytest.mark.parametrize("chunk_size", [0, 5])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_forward_equals_unshared_in_values_and_lora_gradients(tiny_model_dir, tiny_tokenizer, attn, chunk_size):
    from dpo_lora.model import chunked_logps
    from dpo_lora.model.load import reference_mode

    model = lora_model(tiny_model_dir, attn)
    if chunk_size:
        assert chunked_logps.install(model, chunk_size)
    assert unsupported_reason(model, max_length=64) is None
    features = random_pairs(5, len(tiny_tokenizer), seed=chunk_size)
    unshared = collate_pairs(features, tiny_tokenizer.pad_token_id)
    shared = collate_pairs(features, tiny_tokenizer.pad_token_id, share_prompt=True)
    assert shared["input_ids"].numel() < unshared["input_ids"].numel()

    want, got = logps_and_grads(model, unshared), logps_and_grads(model, shared)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad(), reference_mode(model):  # the reference (adapter off) too
        torch.testing.assert_close(
            concatenated_logps(model, shared)[0], concatenated_logps(model, unshared)[0], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("share_prompt", [False, True])
def test_rows_padded_to_a_multiple_score_the_same_in_values_and_lora_gradients(
    tiny_model_dir, tiny_tokenizer, share_prompt
):
    from dpo_lora.model import shared_attention

    model = lora_model(tiny_model_dir, "sdpa")
    shared_attention.use_on(model)  # split attention where the prompt is shared; sdpa for plain rows
    features = random_pairs(4, len(tiny_tokenizer), seed=7)
    pad = tiny_tokenizer.pad_token_id
    tight = collate_pairs(features, pad, share_prompt=share_prompt)
    padded = collate_pairs(features, pad, share_prompt=share_prompt, pad_to_multiple_of=24)
    rows, width = padded["input_ids"].shape
    assert width % 24 == 0 and width > tight["input_ids"].shape[1]
    assert padded[HOST].tokens == tight[HOST].tokens == int(padded["attention_mask"].sum())
    assert padded[HOST].slots == rows * width and tight[HOST].slots == tight["input_ids"].numel()

    want, got = logps_and_grads(model, tight), logps_and_grads(model, padded)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    packed = collate_pairs(features, pad, pack=True, pad_to_multiple_of=24)  # packed rows carry no padding
    assert packed[HOST].slots == packed[HOST].tokens == packed["input_ids"].numel()


@pytest.mark.parametrize("attention", ["mask", "split"])
def test_bfloat16_shared_forward_stays_within_bfloat16_rounding(tiny_model_dir, tiny_tokenizer, attention):
    from dpo_lora.model import shared_attention

    model = lora_model(tiny_model_dir, "sdpa", dtype="bfloat16")
    features = random_pairs(4, len(tiny_tokenizer), seed=3)
    with torch.no_grad():
        want = concatenated_logps(model, collate_pairs(features, tiny_tokenizer.pad_token_id))[0]
        if attention == "split":  # the mask path is the model's own sdpa with the 4D mask
            shared_attention.use_on(model)
        got = concatenated_logps(model, collate_pairs(features, tiny_tokenizer.pad_token_id, share_prompt=True))[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.1)


def test_kernels_and_models_that_cannot_take_the_mask_fall_back():
    from transformers import LlamaConfig, MistralConfig

    class Model:
        def __init__(self, config):
            self.config = config

    def config(cls, attn, **extra):
        c = cls(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, **extra)
        c._attn_implementation = attn
        return c

    assert unsupported_reason(Model(config(LlamaConfig, "sdpa")), 1024) is None
    assert unsupported_reason(Model(config(LlamaConfig, "eager")), 1024) is None
    assert "flash_attention_2" in unsupported_reason(Model(config(LlamaConfig, "flash_attention_2")), 1024)
    assert "sliding" in unsupported_reason(Model(config(MistralConfig, "sdpa", sliding_window=256)), 1024)
    # A window no sequence reaches is full attention.
    assert unsupported_reason(Model(config(MistralConfig, "sdpa", sliding_window=4096)), 1024) is None


def test_training_with_a_shared_prompt_follows_the_unshared_run(tiny_model_dir, tmp_path):
    from dpo_lora.train.loop import train

    from ..train.test_loop import tiny_config, train_rows

    run = ["train.max_steps=3", "train.micro_batch_size=2", "train.grad_accum=2", "data.eval=null"]
    train(tiny_config(tiny_model_dir, tmp_path / "plain", *run, "train.share_prompt=false"))
    train(tiny_config(tiny_model_dir, tmp_path / "shared", *run, "train.share_prompt=true"))
    expected, got = train_rows(tmp_path / "plain"), train_rows(tmp_path / "shared")
    assert expected[-1]["loss"] < expected[0]["loss"] - 0.005  # the runs learn: the comparison is not vacuous
    for row, want in zip(got, expected, strict=True):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
            # float rounding only (the bar is 1e-3 on the loss)
            assert row[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), (row["step"], name)
        assert row["tokens_per_s"] / row["pairs_per_s"] < want["tokens_per_s"] / want["pairs_per_s"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_equal_padded_rows_in_values_and_lora_gradients(tiny_model_dir, tiny_tokenizer, attn):
    """Padding-free packing (the layout flash_attention_2 runs varlen); here transformers turns the
    restarting positions into a block-diagonal mask, which checks the layout and the scoring."""
    model = lora_model(tiny_model_dir, attn)
    features = random_pairs(4, len(tiny_tokenizer), seed=11)
    padded = collate_pairs(features, tiny_tokenizer.pad_token_id)
    packed = collate_pairs(features, tiny_tokenizer.pad_token_id, pack=True)
    assert packed["input_ids"].numel() == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()
    want, got = logps_and_grads(model, padded), logps_and_grads(model, packed)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_collate_puts_chosen_then_rejected_and_scores_only_completion_tokens():
    features = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6], "row_index": 7},
        {"prompt_ids": [8], "chosen_ids": [9], "rejected_ids": [10, 11], "row_index": 9},
    ]
    batch = collate_pairs(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [8, 9, 0, 0, 0], [1, 2, 6, 0, 0], [8, 10, 11, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert torch.equal(batch["row_index"], torch.tensor([7, 9]))
    # Scored: each completion token, from the position just before it, chosen rows then rejected.
    assert batch["completion_lengths"].tolist() == [3, 1, 1, 2]
    assert batch["score_target"].tolist() == [3, 4, 5, 9, 6, 10, 11]
    assert batch["score_index"].tolist() == [1, 2, 3, 5, 11, 15, 16]
    assert batch["input_ids"].flatten()[batch["score_index"] + 1].tolist() == batch["score_target"].tolist()


def test_packed_collate_puts_every_sequence_in_one_row_with_restarting_positions():
    features = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
        {"prompt_ids": [8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ]
    batch = collate_pairs(features, pad_token_id=0, pack=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 8, 9, 1, 2, 6, 8, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 13]  # no padding
    assert batch["score_target"].tolist() == [3, 4, 5, 9, 6, 10, 11]
    flat = batch["input_ids"].flatten()
    # each target is the token right after its scoring position, inside its own sequence
    assert flat[batch["score_index"] + 1].tolist() == batch["score_target"].tolist()
    assert batch["score_index"].tolist() == [1, 2, 3, 5, 8, 10, 11]
    assert batch["completion_lengths"].tolist() == [3, 1, 1, 2]


@pytest.mark.parametrize("layout", [{}, {"pack": True}, {"share_prompt": True}])
def test_every_score_position_lies_inside_its_own_sequence(layout):
    features = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [4], "chosen_ids": [3, 2], "rejected_ids": [8, 8, 8, 2]},
    ]
    batch = collate_pairs(features, pad_token_id=0, **layout)
    ids, index = batch["input_ids"].flatten(), batch["score_index"]
    assert (index >= 0).all() and (batch["attention_mask"].flatten()[index] == 1).all(), "never padding"
    if "branch" in batch:  # shared: a rejected token's first predictor is the last prompt token
        rows = index // batch["input_ids"].shape[1]
        pairs = torch.arange(len(features)).repeat(2)  # completion_lengths: all chosen, then all rejected
        assert torch.equal(rows, pairs.repeat_interleave(batch["completion_lengths"]))
    else:  # each scored position is followed, in the same sequence, by its target
        assert torch.equal(ids[index + 1], batch["score_target"])
    with pytest.raises(ValueError, match="no prompt token"):
        collate_pairs([{**features[0], "prompt_ids": []}, features[1]], pad_token_id=0, **layout)
