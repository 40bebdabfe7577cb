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
