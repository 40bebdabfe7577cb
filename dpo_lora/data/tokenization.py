"""Tokenizing normalized pairs (collating them into batches is dpo_lora.data.layout's job).

Prompt and completions are tokenized separately, so no token ever spans the prompt/completion
boundary and the completion tokens are exactly the tokens the model is scored on. Completions
end with EOS. A prompt over `max_prompt_length` keeps its leading special tokens and its end,
then the completions are cut to fit `max_length`.
"""

from __future__ import annotations


def completion_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a completion, ending with EOS exactly once."""
    if chat:
        # Chat templates close a turn with their own end token plus a newline: EOS (ChatML, Llama-3's
        # <|eot_id|>) or another special token (Gemma's <end_of_turn>). Either ends the completion;
        # decided by token id, since an EOS appended after <end_of_turn> is off the model's distribution.
        ids = tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"]
        return ids if ids and ids[-1] in set(tokenizer.all_special_ids) else ids + [tokenizer.eos_token_id]
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_pair(row: dict, tokenizer, *, max_length: int, max_prompt_length: int) -> dict[str, list[int]]:
    """A normalized row ({"prompt", "chosen", "rejected", "chat"}) -> prompt/chosen/rejected ids."""
    # A rendered chat prompt already carries its special tokens; a plain one gets the tokenizer's.
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=not row["chat"])["input_ids"]
    truncated = len(prompt_ids) > max_prompt_length
    if truncated:
        # Keep the leading special tokens (BOS, the template's first turn marker) and the end; the
        # middle goes. Cutting from the left would start the model mid-text with no BOS.
        special = set(tokenizer.all_special_ids)
        head = 0
        while head < min(len(prompt_ids), max_prompt_length // 2) and prompt_ids[head] in special:
            head += 1
        prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (max_prompt_length - head) :]
    budget = max_length - len(prompt_ids)
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": completion_ids(tokenizer, row["chosen"], row["chat"])[:budget],
        "rejected_ids": completion_ids(tokenizer, row["rejected"], row["chat"])[:budget],
        "prompt_truncated": truncated,
    }
