"""Prompt sharing: one row per pair, prompt + chosen + rejected, so the prompt runs once.

Unshared, a pair costs 2P + C + R tokens (the prompt in both sequences); shared, P + C + R. The
row is laid out [prompt | chosen | rejected] and made to compute exactly what the two unshared
sequences compute:
- attention: every token sees the earlier tokens of its own branch and the prompt, so rejected
  tokens never see chosen ones (a 4D mask built from each token's branch);
- positions: the rejected branch restarts at P, as if it followed the prompt directly;
- scoring: the first completion token of both branches is predicted from the last prompt token.
Needs an attention kernel that takes an arbitrary 4D mask (sdpa, eager) and full attention in
every layer; elsewhere the trainer keeps the unshared layout (`unsupported_reason`).
"""

from __future__ import annotations

import torch

from dpo_lora.tokenization import add_pair_fields

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
MASK_KERNELS = ("sdpa", "eager")  # attention implementations that take a 4D additive mask as given


def collate_shared(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> B right-padded rows [prompt | chosen | rejected].

    Returns input_ids, attention_mask (1 on real tokens), position_ids, branch (PROMPT/CHOSEN/
    REJECTED/PAD), all [B, T]; score_index [N] (flat positions into B*T), score_target [N] and
    completion_lengths [2B], ordered like the unshared layout: all chosen, then all rejected.
    """
    width = max(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    shape = (len(features), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    branch = torch.full(shape, PAD, dtype=torch.long)
    chosen_index, rejected_index = [], []
    for i, f in enumerate(features):
        n_prompt, n_chosen, n_rejected = len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])
        if n_prompt < 1:  # the first completion token would be scored from outside its sequence
            raise ValueError("a pair with no prompt token reached collation (data.check_row drops them)")
        n_total = n_prompt + n_chosen + n_rejected
        input_ids[i, :n_total] = torch.tensor(f["prompt_ids"] + f["chosen_ids"] + f["rejected_ids"])
        attention_mask[i, :n_total] = 1
        position_ids[i, : n_prompt + n_chosen] = torch.arange(n_prompt + n_chosen)
        position_ids[i, n_prompt + n_chosen : n_total] = torch.arange(n_prompt, n_prompt + n_rejected)
        branch[i, :n_prompt] = PROMPT
        branch[i, n_prompt : n_prompt + n_chosen] = CHOSEN
        branch[i, n_prompt + n_chosen : n_total] = REJECTED
        row = i * width
        # Token j of a completion is predicted at the position before it in its own branch; for
        # j = 0 that is the last prompt token, for both branches.
        chosen_index += range(row + n_prompt - 1, row + n_prompt + n_chosen - 1)
        rejected_start = row + n_prompt + n_chosen
        rejected_index += [row + n_prompt - 1, *range(rejected_start, rejected_start + n_rejected - 1)]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "branch": branch,
        "score_index": torch.tensor(chosen_index + rejected_index, dtype=torch.long),
        "score_target": torch.tensor(
            [t for f in features for t in f["chosen_ids"]] + [t for f in features for t in f["rejected_ids"]],
            dtype=torch.long,
        ),
        "completion_lengths": torch.tensor(
            [len(f["chosen_ids"]) for f in features] + [len(f["rejected_ids"]) for f in features], dtype=torch.long
        ),
    }
    return add_pair_fields(batch, features)


def attention_bias(branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4D mask of the shared layout: branch [B, T] -> [B, 1, T, T] (0 = attend).

    Query q sees key k iff k <= q, neither is padding, and k is in the prompt or in q's branch.
    Padding queries see only themselves, so no softmax row is empty (an empty row gives NaN, and a NaN
    value times a zero weight would still reach real tokens).
    """
    length = branch.shape[1]
    positions = torch.arange(length, device=branch.device)
    query, key = branch[:, :, None], branch[:, None, :]
    same_branch = (key == PROMPT) | (key == query)
    allowed = (positions[None, :] <= positions[:, None]) & (key != PAD) & (query != PAD) & same_branch
    allowed |= torch.eye(length, dtype=torch.bool, device=branch.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=branch.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def unsupported_reason(model, max_length: int) -> str | None:
    """Why the shared layout would not compute the unshared function on `model`, or None."""
    config = model.config
    kernel = getattr(config, "_attn_implementation", None)
    if kernel not in MASK_KERNELS:
        return f"attention implementation {kernel!r} takes no 4D mask (use sdpa or eager)"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    if layer_types != {"full_attention"} or (window is not None and window < max_length):
        return "the model has sliding-window or non-standard attention layers"
    return None
