"""Tokenization: completion tokens are exactly what is scored; truncation; the collated batch."""

from __future__ import annotations

import pytest
import torch

from dpo_lora.tokenization import collate_pairs, tokenize_pair


def test_completion_tokens_are_the_completion_alone_plus_one_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"prompt": "The plot was", "chosen": " wonderful", "rejected": " dreadful", "chat": False}
    ids = tokenize_pair(row, tok, max_length=64, max_prompt_length=32)
    assert ids["prompt_ids"] == tok("The plot was")["input_ids"]
    assert ids["chosen_ids"] == tok(" wonderful", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids["rejected_ids"]) == " dreadful" + tok.eos_token


def test_chat_completion_keeps_the_template_end_token_once(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {
        "prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "hello<|im_end|>\n",
        "rejected": "no<|im_end|>\n",
        "chat": True,
    }
    ids = tokenize_pair(row, tok, max_length=64, max_prompt_length=32)
    assert ids["chosen_ids"].count(tok.eos_token_id) == 1 and ids["chosen_ids"][-1] == tok.eos_token_id
    assert tok.decode(ids["prompt_ids"] + ids["chosen_ids"]) == row["prompt"] + "hello<|im_end|>"


def test_a_template_end_of_turn_token_other_than_eos_ends_the_completion(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})  # Gemma's turn end
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    row = {
        "prompt": "<start>user\nhi\n",
        "chosen": "hello<end_of_turn>\n",
        "rejected": "no<end_of_turn>\n",
        "chat": True,
    }
    ids = tokenize_pair(row, tok, max_length=64, max_prompt_length=32)
    assert ids["chosen_ids"][-1] == end_of_turn and tok.eos_token_id not in ids["chosen_ids"]
    plain = tokenize_pair({**row, "chosen": "hello", "rejected": "no"}, tok, max_length=64, max_prompt_length=32)
    assert plain["chosen_ids"][-1] == tok.eos_token_id, "a turn without an end token still gets EOS"


def test_truncation_keeps_prompt_end_then_cuts_completions(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = " ".join(["word"] * 40)
    row = {"prompt": prompt, "chosen": " good " * 30, "rejected": " bad", "chat": False}
    ids = tokenize_pair(row, tok, max_length=24, max_prompt_length=10)
    full_prompt = tok(prompt)["input_ids"]
    assert ids["prompt_ids"] == full_prompt[-10:] and ids["prompt_truncated"]
    assert len(ids["prompt_ids"]) + len(ids["chosen_ids"]) == 24
    assert ids["rejected_ids"][-1] == tok.eos_token_id  # short completions are untouched
    assert not tokenize_pair({**row, "prompt": "word"}, tok, max_length=24, max_prompt_length=10)["prompt_truncated"]


def test_a_long_chat_prompt_keeps_its_leading_special_tokens_and_its_end(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = "<|im_start|>user\n" + " ".join(["word"] * 40) + " last<|im_end|>\n<|im_start|>assistant\n"
    row = {"prompt": prompt, "chosen": "yes<|im_end|>\n", "rejected": "no<|im_end|>\n", "chat": True}
    ids = tokenize_pair(row, tok, max_length=32, max_prompt_length=12)
    full = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids["prompt_ids"]) == 12 and ids["prompt_truncated"]
    assert ids["prompt_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>"), "the prompt still starts a turn"
    assert ids["prompt_ids"][1:] == full[-11:], "and ends where the reply begins"


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
