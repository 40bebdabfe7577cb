"""Held-out pair metrics over the whole eval set, every pair counted once across all ranks."""

from __future__ import annotations

import math

import torch

from dpo_lora.data.layout import HOST, to_device
from dpo_lora.train.metrics import MetricWindow, pair_metrics
from dpo_lora.train.step import pair_losses, preference_step, reference_logps


class EvalShard(torch.utils.data.Dataset):
    """This rank's share of the eval set. Every rank gets the same number of items (collectives
    stay in step); the padding items repeat real ones with weight 0 so no pair counts twice."""

    def __init__(self, dataset, rank: int, world_size: int) -> None:
        self.dataset = dataset
        padded = math.ceil(len(dataset) / world_size) * world_size
        self.items = [(i % len(dataset), float(i < len(dataset))) for i in range(rank, padded, world_size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        index, weight = self.items[i]
        return {**self.dataset[index], "weight": weight}


def evaluate(engine, loader, dpo_config, device, policy_is_reference: bool = False) -> dict[str, float]:
    """Pair metrics over the whole eval set (all ranks), named `eval/...`.

    `policy_is_reference`: the policy computes the reference's function (a run's first step, whose
    adapter is the reference's: zero LoRA B, or the init adapter), so its log-probs are the
    reference's and one forward per batch (none with precomputed reference scores) gives them.
    """
    engine.eval()
    window = MetricWindow(pair_metrics(dpo_config))
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            if policy_is_reference and dpo_config.uses_reference and not dpo_config.wpo:  # WPO reads the policy
                ref_logps = reference_logps(engine, batch, dpo_config)
                lengths, labels = batch["completion_lengths"], batch.get("label")
                _, stats = pair_losses(ref_logps, ref_logps, lengths, dpo_config, labels=labels)
            else:
                _, stats = preference_step(engine, batch, dpo_config)
            window.add(stats, tokens=batch[HOST].tokens, weight=batch["weight"])
    engine.train()
    reduced = window.reduce()
    return {f"eval/{name}": value for name, value in reduced.items() if name not in ("tokens", "slots")}
