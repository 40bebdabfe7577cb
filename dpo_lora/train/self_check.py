"""Startup self-check: each fast path against the plain computation, on the first micro-batch.

The chunked LM head, the shared-prompt layout and packing are exact on the architectures the
tests build, and are chosen per model by a static check of its config. A model that check does not
know (a head that rescales its logits, ALiBi positions that ignore position_ids) would train on
wrong log-probs with no error. So before the first step the first micro-batch is scored with no
grad and no dropout, as training will score it and as the plain path does (full logits, one row
per sequence), with the adapter on and as the reference. A fast path whose log-probs differ beyond
the tolerance is switched off for the run, with one line naming it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from dpo_lora.core.distributed import all_reduce_sum
from dpo_lora.data.layout import collate_pairs, to_device
from dpo_lora.model import chunked_logps
from dpo_lora.model.load import reference_mode
from dpo_lora.train.step import concatenated_logps

# Largest accepted per-token difference of a sequence's log-prob, by compute dtype: the fast paths
# only reorder sums (fp32: ~1e-5 in tests/train/test_parity.py); a wrong path is off by whole nats.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.02}
PAIRS = 1  # one pair: its chosen and rejected rows differ in length, so padding and packing are exercised


def self_check(engine, features: list[dict], collate, pad_token_id: int, device) -> tuple[object, list[str]]:
    """(collate to train with, notices): `collate` itself, or the plain one where the layout failed.
    The chunked head is uninstalled from the model where it failed."""

    model = engine.module
    features = features[:PAIRS]
    plain_collate = functools.partial(collate_pairs, pad_token_id=pad_token_id)
    plain = to_device(plain_collate(features), device)
    tolerance = TOLERANCE[model.get_input_embeddings().weight.dtype]
    head_key = "train.logps_chunk_size" if chunked_logps._installed_head(model) else None
    layout_key = {"share_prompt": "train.share_prompt", "pack": "train.pack_sequences"}
    layout_key = next((key for flag, key in layout_key.items() if collate.keywords.get(flag)), None)
    fast = to_device(collate(features), device) if layout_key else None
    gaps = dict.fromkeys(filter(None, (head_key, layout_key)), 0.0)
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        for reference in (False, True):
            with reference_mode(model) if reference else contextlib.nullcontext():
                expected = _per_token(engine, plain, chunked_head=False)
                # The head is the same module with the adapter on or off: checked once.
                if head_key and not reference:
                    chunked = functools.partial(_per_token, engine, plain, chunked_head=True)
                    gaps[head_key] = max(gaps[head_key], _gap(chunked, expected))
                if layout_key:
                    laid_out = functools.partial(_per_token, engine, fast, chunked_head=False)
                    gaps[layout_key] = max(gaps[layout_key], _gap(laid_out, expected))
    engine.train(was_training)
    notices = []
    name = type(model.get_base_model()).__name__
    for key, gap in gaps.items():
        # Every rank checks the same pairs; any rank's failure switches the path off everywhere.
        failed_ranks = all_reduce_sum(torch.tensor([float(gap > tolerance)], dtype=torch.float64)).item()
        if failed_ranks > 0:
            notices.append(
                f"self-check: {key} off for {name}: its log-probs differ from the plain path by "
                f"{gap:.3g} per token (tolerance {tolerance})"
            )
            if key == head_key:
                chunked_logps.uninstall(model)
            else:
                collate = plain_collate
    return collate, notices


def _per_token(engine, batch: dict, chunked_head: bool) -> torch.Tensor:

    logps, lengths = concatenated_logps(engine, batch, chunked_head=chunked_head)
    return logps.float() / lengths.clamp(min=1)


def _gap(score, expected: torch.Tensor) -> float:
    """Largest per-token gap, or infinity when the fast path fails outright (or gives NaN)."""
    try:
        got = score()
    except Exception:  # a layout the model cannot run (e.g. a 4D mask it does not take) is a failure
        return float("inf")
    gap = (got - expected).abs().max().item()
    return gap if gap == gap else float("inf")
