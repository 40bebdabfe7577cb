"""Reference log-probs computed once: the eval set's always, the training set's with
`dpo.reference: precompute` (or `auto`, when the run covers at least one epoch).

The reference is the frozen base (or the frozen initial adapter), so each training pair's
reference score never changes: compute it once, with no grad, and cache it on disk under a
fingerprint of everything it depends on. Training then runs no reference forward at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from dpo_lora.core.distributed import barrier, broadcast_from_main, gather_lists
from dpo_lora.data.layout import to_device
from dpo_lora.model.load import reference_mode
from dpo_lora.train.step import concatenated_logps

CHOSEN, REJECTED = "reference_chosen_logps", "reference_rejected_logps"


def cache_dir() -> Path:
    """Where cached reference log-probs live: $DPO_LORA_CACHE, else ~/.cache/dpo-lora."""
    return Path(os.environ.get("DPO_LORA_CACHE", "~/.cache/dpo-lora")).expanduser() / "reference"


def _files_signature(path: str | None) -> list:
    """Names, sizes and modification times of a model or adapter folder's files."""
    if not path or not Path(path).is_dir():
        return [path]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(path).iterdir()) if f.is_file()]


def reference_fingerprint(model_config, lora_config, train_set, ld_alpha: float = 1.0) -> str:
    """Changes whenever the reference scores could: weights, quantization, dtype, data, tokenization.

    The tokenized dataset's own fingerprint covers the data files, tokenizer and truncation.
    """
    parts = {
        "data": train_set._fingerprint,
        "model": [model_config.path, _files_signature(model_config.path)],
        "quantization": model_config.quantization,
        "dtype": model_config.dtype,
        "attention": model_config.attn_implementation,
        "reference_adapter": _files_signature(lora_config.init_adapter) if lora_config.init_adapter else None,
        **({"ld_alpha": ld_alpha} if ld_alpha != 1.0 else {}),  # LD-DPO weighs the scores themselves
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_reference_logps(engine, dataset, collate, batch_size: int, rank: int, world_size: int, device, ld_alpha: float = 1.0):  # fmt: skip
    """Reference log-probs of every pair: a float32 tensor [N, 2] (chosen, rejected).

    Each rank scores an equal share (ZeRO-3 needs every rank in every forward); pairs are
    gathered back by index.
    """
    per_rank = math.ceil(len(dataset) / world_size)
    indices = [(rank + world_size * i) % len(dataset) for i in range(per_rank)]
    scored = []
    was_training = engine.training
    engine.eval()
    with reference_mode(getattr(engine, "module", engine)):
        for start in range(0, per_rank, batch_size):
            chunk = indices[start : start + batch_size]
            batch = to_device(collate([dataset[i] for i in chunk]), device)
            logps, _ = concatenated_logps(engine, batch, ld_alpha=ld_alpha)
            n = len(chunk)
            scored += [(i, c, r) for i, c, r in zip(chunk, logps[:n].tolist(), logps[n:].tolist(), strict=True)]
    engine.train(was_training)  # `eval` scores its policy next, in eval mode (no LoRA dropout)
    result = torch.empty(len(dataset), 2, dtype=torch.float32)
    for index, chosen, rejected in gather_lists(scored):
        result[index] = torch.tensor([chosen, rejected])
    return result


def reference_choice(dpo_config, pairs_trained: int, pairs: int) -> tuple[str, str]:
    """("online" | "precompute" | "none", why in a few words) for a run that trains on
    `pairs_trained` pairs (steps x global batch) out of a training set of `pairs`.

    Precomputing scores each pair once; online scores each pair every time a step takes it. So
    precompute costs less when every pair is seen at least once, i.e. from one epoch on (and it frees
    the reference forward's activations from the step); a shorter run scores fewer pairs online.
    The reference is the frozen base or the frozen init adapter, so either way gives the same scores.
    """
    if dpo_config.reference_free:
        return "none", "dpo.reference_free"
    if not dpo_config.uses_reference:
        return "none", f"dpo.loss {dpo_config.loss} reads the policy alone"
    if dpo_config.reference != "auto":
        return dpo_config.reference, "set in the config"
    if dpo_config.sync_reference_every:
        return "online", f"the reference becomes the policy every {dpo_config.sync_reference_every} steps"
    epochs = pairs_trained / pairs
    if epochs >= 1:
        return (
            "precompute",
            f"the run covers {epochs:.2f} epochs of {pairs} pairs, so scoring each pair once costs least",
        )
    return (
        "online",
        f"the run covers {epochs:.2f} of an epoch ({pairs_trained} of {pairs} pairs), so scoring online costs least",
    )


def cached_or_computed(path: Path, compute, is_main: bool) -> torch.Tensor:
    """The tensor cached at `path`, else `compute()` (run by every rank) cached by rank 0.

    Rank 0 alone looks at the cache and sends what it read: with node-local caches, ranks deciding
    from their own disks would split between computing (collectives inside) and waiting, and hang.
    """
    from safetensors.torch import load_file, save_file

    cached = broadcast_from_main(load_file(path)["logps"] if is_main and path.is_file() else None)
    if cached is not None:
        return cached
    logps = compute()
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({"logps": logps}, str(partial))
        partial.rename(path)  # a crash mid-write never leaves a file that looks complete
    barrier()
    return logps


def with_reference_logps(engine, train_set, config, collate, dist):
    """`train_set` with the two reference columns, from the cache or computed (and cached) now."""
    path = cache_dir() / f"{reference_fingerprint(config.model, config.lora, train_set, config.dpo.ld_alpha)}.safetensors"  # fmt: skip
    logps = cached_or_computed(
        path,
        lambda: compute_reference_logps(
            engine,
            train_set,
            collate,
            config.train.eval_batch_size,
            dist.rank,
            dist.world_size,
            dist.device,
            config.dpo.ld_alpha,
        ),  # fmt: skip
        dist.is_main,
    )
    if logps.shape != (len(train_set), 2):
        raise RuntimeError(f"{path}: holds {tuple(logps.shape)} scores for {len(train_set)} pairs")
    return train_set.add_column(CHOSEN, logps[:, 0].tolist()).add_column(REJECTED, logps[:, 1].tolist())
