"""Tokenizing normalized pairs and collating them into one chosen+rejected batch.

Prompt and completions are tokenized separately, so no token ever spans the prompt/completion
boundary and the completion tokens are exactly the tokens the model is scored on. Completions
end with EOS. A prompt over `max_prompt_length` keeps its leading special tokens and its end,
then the completions are cut to fit `max_length`.
"""

from __future__ import annotations

import torch

# Attention kernels that run packed sequences (found from restarting position_ids) without a dense mask.
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")


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


def collate_pairs(
    features: list[dict], pad_token_id: int, share_prompt: bool = False, pack: bool = False
) -> dict[str, torch.Tensor]:
    """Stack B pairs into one right-padded batch of 2B sequences: rows [0, B) are prompt+chosen,
    rows [B, 2B) prompt+rejected, so one forward scores both.

    Returns input_ids and attention_mask (both [2B, T]); where the model is scored: score_index [N] (flat positions into 2B*T, each
    predicting the next token), score_target [N], completion_lengths [2B] (chosen then rejected;
    N = their sum); `row_index`/`weight` [B] and `reference_logps` [2B] when the features carry them.
    With `pack`, all 2B sequences share one row [1, T] with no padding, and position_ids [1, T]
    restart at 0 for each, from which the attention kernel finds the sequence boundaries.
    With `share_prompt`, the layout of dpo_lora.prompt_sharing instead (B rows, the prompt once).
    """
    if share_prompt:
        from dpo_lora.prompt_sharing import collate_shared

        return collate_shared(features, pad_token_id)
    sequences = [(f["prompt_ids"], f["chosen_ids"]) for f in features]
    sequences += [(f["prompt_ids"], f["rejected_ids"]) for f in features]
    rows = [sequences] if pack else [[sequence] for sequence in sequences]
    width = max(sum(len(p) + len(c) for p, c in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    score_index = []
    for r, row in enumerate(rows):
        start = 0
        for prompt, completion in row:
            n_prompt, n_total = len(prompt), len(prompt) + len(completion)
            if n_prompt < 1:  # the first completion token would be scored from outside its sequence
                raise ValueError("a pair with no prompt token reached collation (data.check_row drops them)")
            span = slice(start, start + n_total)
            input_ids[r, span] = torch.tensor(prompt + completion, dtype=torch.long)
            attention_mask[r, span] = 1
            position_ids[r, span] = torch.arange(n_total)
            score_index += range(r * width + start + n_prompt - 1, r * width + start + n_total - 1)
            start += n_total
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "score_index": torch.tensor(score_index, dtype=torch.long),
        "score_target": torch.tensor([t for _, completion in sequences for t in completion], dtype=torch.long),
        "completion_lengths": torch.tensor([len(c) for _, c in sequences], dtype=torch.long),
    }
    if pack:
        batch["position_ids"] = position_ids
    return add_pair_fields(batch, features)


def add_pair_fields(batch: dict, features: list[dict]) -> dict:
    """Per-pair fields ride along: the source row (for error reports), an eval weight, and
    precomputed reference log-probs (dpo.reference: precompute) as [2B], chosen then rejected."""
    for key, dtype in (("row_index", torch.long), ("weight", torch.float32)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=dtype)
    if "reference_chosen_logps" in features[0]:
        scores = [f["reference_chosen_logps"] for f in features] + [f["reference_rejected_logps"] for f in features]
        batch["reference_logps"] = torch.tensor(scores, dtype=torch.float32)
    return batch
