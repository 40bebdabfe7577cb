"""How a batch of pairs is laid out for the model: the choice (once per run, from the model and the
config), the collate function of each layout, and the attention mask of the shared one.

Three layouts, all scoring exactly the same tokens (tests/data/test_layout.py, and the startup
self-check in dpo_lora.train.self_check compares them on the run's own model):
- plain: 2B right-padded rows, B x [prompt | chosen] then B x [prompt | rejected];
- packed: the 2B sequences in one row with restarting position_ids and no padding (flash-attention
  kernels find the sequence boundaries from the positions);
- shared prompt: B rows [prompt | chosen | rejected], so the prompt runs once.

Prompt sharing in detail. Unshared, a pair costs 2P + C + R tokens (the prompt in both sequences);
shared, P + C + R. The row is made to compute exactly what the two unshared sequences compute:
- attention: every token sees the earlier tokens of its own branch and the prompt, so rejected
  tokens never see chosen ones (a 4D mask built from each token's branch);
- positions: the rejected branch restarts at P, as if it followed the prompt directly;
- scoring: the first completion token of both branches is predicted from the last prompt token.
On sdpa models the attention runs as two fused causal calls with no mask
(dpo_lora.model.shared_attention, `train.shared_prompt_attention: split`) or, on CUDA, as one
FlexAttention call with a block mask (`flex`); elsewhere, or with `mask`, as
one call with a dense 4D mask built from each token's branch (`attention_bias`). Either needs full
attention in every layer; elsewhere the plain layout is kept (`unsupported_reason`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from dpo_lora.core import transfer
from dpo_lora.model import shared_attention

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # the branch of each token in the shared layout
MASK_KERNELS = ("sdpa", "eager")  # attention implementations that take a 4D additive mask as given
SHARED_KERNELS = (*MASK_KERNELS, *shared_attention.KERNELS.values())  # ... and sdpa's split and flex paths
# Attention kernels that run packed sequences (found from restarting position_ids) without a dense mask.
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")


HOST = "host"  # the batch key of its HostFacts


class HostFacts(NamedTuple):
    """What the step needs to know about a batch as Python values, so it never reads them back
    from the device (each read would make the host wait for the GPU's queue to drain)."""

    tokens: int  # real tokens (attention_mask's sum): the throughput counter
    slots: int  # rows x width: the positions the model computes, padding included
    max_completion: int  # the longest completion: the width of the per-sequence sum
    branch_lengths: tuple[tuple[int, int, int], ...] | None  # shared layout: each row's (P, C, R)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch's tensors on `device`, copied without making the host wait; HOST stays."""
    return {key: value if key == HOST else transfer.to_device(value, device) for key, value in batch.items()}


def batch_layout(config, model, pad_token_id: int):
    """(collate function, notices): the prompt shared by chosen and rejected where the model allows
    it, sequences packed without padding where the attention kernel has a varlen path. Each notice
    is one line saying which option is off and why."""
    notices = []
    share, pack = config.train.share_prompt, config.train.pack_sequences
    if share and (reason := unsupported_reason(model, config.data.max_length)):
        share = False
        notices.append(f"train.share_prompt off: {reason}")
    choice = config.train.shared_prompt_attention
    if share and choice in shared_attention.KERNELS and model.config._attn_implementation == "sdpa":
        device = next(model.parameters()).device
        dropout = getattr(model.config, "attention_dropout", 0.0) or 0.0
        if choice == "flex" and (reason := shared_attention.flex_unavailable(device, dropout)):
            choice = "split"
            notices.append(f"train.shared_prompt_attention: split, not flex: {reason}")
        shared_attention.use_on(model, choice)
    if pack and (kernel := model.config._attn_implementation) not in VARLEN_KERNELS:
        pack = False
        notices.append(f"train.pack_sequences off: {kernel!r} has no varlen kernel (use flash_attention_2)")
    multiple = config.train.pad_to_multiple_of
    collate = functools.partial(
        collate_pairs, pad_token_id=pad_token_id, share_prompt=share, pack=pack, pad_to_multiple_of=multiple
    )
    return collate, notices


def unsupported_reason(model, max_length: int) -> str | None:
    """Why the shared layout would not compute the unshared function on `model`, or None."""
    config = model.config
    kernel = getattr(config, "_attn_implementation", None)
    if kernel not in SHARED_KERNELS:
        return f"attention implementation {kernel!r} takes no 4D mask (use sdpa or eager)"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    if layer_types != {"full_attention"} or (window is not None and window < max_length):
        return "the model has sliding-window or non-standard attention layers"
    return None


def padded_width(longest: int, multiple: int) -> int:
    """A batch's width: its longest row, rounded up to a multiple of `multiple` (0: not rounded)."""
    return -(-longest // multiple) * multiple if multiple else longest


def collate_pairs(
    features: list[dict],
    pad_token_id: int,
    share_prompt: bool = False,
    pack: bool = False,
    pad_to_multiple_of: int = 0,
) -> dict[str, torch.Tensor]:
    """Stack B pairs into one right-padded batch of 2B sequences: rows [0, B) are prompt+chosen,
    rows [B, 2B) prompt+rejected, so one forward scores both.

    Returns input_ids and attention_mask (both [2B, T]); where the model is scored: score_index [N] (flat positions into 2B*T, each
    predicting the next token), score_target [N], completion_lengths [2B] (chosen then rejected;
    N = their sum); `row_index`/`weight` [B] and `reference_logps` [2B] when the features carry them;
    HOST: the batch's HostFacts.
    With `pack`, all 2B sequences share one row [1, T] with no padding, and position_ids [1, T]
    restart at 0 for each, from which the attention kernel finds the sequence boundaries.
    With `share_prompt`, the shared layout instead (`collate_shared`: B rows, the prompt once).
    Padded rows are `pad_to_multiple_of` wide (rounded up; 0: the longest row); packed ones are not padded.
    """
    if share_prompt:
        return collate_shared(features, pad_token_id, pad_to_multiple_of)
    sequences = [(f["prompt_ids"], f["chosen_ids"]) for f in features]
    sequences += [(f["prompt_ids"], f["rejected_ids"]) for f in features]
    rows = [sequences] if pack else [[sequence] for sequence in sequences]
    width = max(sum(len(p) + len(c) for p, c in row) for row in rows)
    width = width if pack else padded_width(width, pad_to_multiple_of)
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
    lengths = [len(c) for _, c in sequences]
    tokens = sum(len(p) for p, _ in sequences) + sum(lengths)
    batch[HOST] = HostFacts(tokens, len(rows) * width, max(lengths), None)
    return add_pair_fields(batch, features)


def add_pair_fields(batch: dict, features: list[dict]) -> dict:
    """Per-pair fields ride along: the source row (for error reports), an eval weight, and
    precomputed reference log-probs (dpo.reference: precompute) as [2B], chosen then rejected."""
    for key, dtype in (("row_index", torch.long), ("weight", torch.float32), ("label", torch.float32)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=dtype)
    if "reference_chosen_logps" in features[0]:
        scores = [f["reference_chosen_logps"] for f in features] + [f["reference_rejected_logps"] for f in features]
        batch["reference_logps"] = torch.tensor(scores, dtype=torch.float32)
    return batch


def collate_shared(features: list[dict], pad_token_id: int, pad_to_multiple_of: int = 0) -> dict[str, torch.Tensor]:
    """B pairs -> B right-padded rows [prompt | chosen | rejected], `pad_to_multiple_of` wide as in collate_pairs.

    Returns input_ids, attention_mask (1 on real tokens), position_ids, branch (PROMPT/CHOSEN/
    REJECTED/PAD), all [B, T]; branch_lengths [B, 3] (each row's prompt, chosen and rejected token
    counts, for dpo_lora.model.shared_attention; the same as Python ints in HostFacts); score_index [N] (flat positions into B*T), score_target
    [N] and completion_lengths [2B], ordered like the unshared layout: all chosen, then all rejected.
    """
    longest = max(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    width = padded_width(longest, pad_to_multiple_of)
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
    rows = tuple((len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "branch": branch,
        "branch_lengths": torch.tensor(rows, dtype=torch.long),
        "score_index": torch.tensor(chosen_index + rejected_index, dtype=torch.long),
        "score_target": torch.tensor(
            [t for f in features for t in f["chosen_ids"]] + [t for f in features for t in f["rejected_ids"]],
            dtype=torch.long,
        ),
        "completion_lengths": torch.tensor(
            [len(f["chosen_ids"]) for f in features] + [len(f["rejected_ids"]) for f in features], dtype=torch.long
        ),
        HOST: HostFacts(sum(map(sum, rows)), len(rows) * width, max(max(c, r) for _, c, r in rows), rows),
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
