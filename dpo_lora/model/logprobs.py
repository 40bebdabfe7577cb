"""Per-sequence log-probabilities of completion tokens."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label_t | tokens_<t) over the positions whose label is not IGNORE_INDEX.

    logits: [B, T, V], the model output for input tokens [B, T].
    labels: [B, T], the input tokens with prompt and padding set to IGNORE_INDEX.
    Returns (logps [B] float32, token_counts [B] long).
    """
    # The logit at position t predicts the token at t + 1.
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    logits = logits.float()
    label_logits = torch.gather(logits, 2, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logps = label_logits - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def token_logps_at(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, sum_sq: bool = False):
    """log softmax(logits)[target] at chosen positions (float32).

    logits: [R, T, V]; index: [N] flat positions into R*T (the position that predicts each target);
    targets: [N] token ids. Returns [N]; with `sum_sq`, [N, 2]: those and log sum_v p_v^2 at each position
    (detached), as the chunked head's scoring returns them.
    """
    picked = logits.flatten(0, 1)[index].float()
    log_normalizer = picked.logsumexp(1)
    logps = picked.gather(1, targets[:, None]).squeeze(1) - log_normalizer
    if not sum_sq:
        return logps
    with torch.no_grad():
        log_sum_sq = (2 * picked).logsumexp(1) - 2 * log_normalizer
    return torch.stack((logps, log_sum_sq), 1)


def sum_by_sequence(
    token_logps: torch.Tensor,
    lengths: torch.Tensor,
    width: int | None = None,
    public: torch.Tensor | None = None,
    tail_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sequence sums of token log-probs laid out sequence after sequence.

    token_logps: [N] with N = lengths.sum(); lengths: [S]; width: at least the largest length, as a
    Python int (None: read from `lengths`, which waits for the device). Returns [S]. A padded
    [S, width] sum rather than index_add_, so the result is deterministic on every device.
    `public` [S] with `tail_weight`: each sequence's tokens from position public[s] on count
    tail_weight times (LD-DPO: sum_{t < l} log p_t + alpha * sum_{t >= l} log p_t).
    """
    if width is None:
        width = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(width, device=lengths.device)[None, :]
    slots = positions < lengths[:, None]
    padded = torch.zeros(slots.shape, dtype=token_logps.dtype, device=token_logps.device)
    padded = padded.masked_scatter(slots, token_logps)
    if public is not None and tail_weight != 1.0:
        padded = torch.where(positions >= public[:, None], padded * tail_weight, padded)
    return padded.sum(-1)
