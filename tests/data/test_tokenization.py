"""Tokenization: completion tokens are exactly what is scored; truncation; the collated batch."""

from __future__ import annotations

from dpo_lora.data.tokenization import tokenize_pair


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
