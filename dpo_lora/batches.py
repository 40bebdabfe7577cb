"""This rank's micro-batches, epoch after epoch, resumable at any micro-batch.

The order is DistributedSampler's (seeded, reshuffled per epoch, each rank a disjoint shard), so a
run with the same seed and global batch sees the same pairs whatever the ranks. The position is
the number of micro-batches consumed; restoring it continues with exactly the next pair, none
seen twice or skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


class PairBatches:
    def __init__(self, dataset, *, micro_batch_size: int, rank: int, world_size: int, seed: int, collate: Callable):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.collate = collate
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_epoch = len(self.sampler) // micro_batch_size
        self.position = 0

    def epoch_of(self, position: int) -> int:
        return position // self.per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield micro-batches from `self.position` on, forever; `position` counts what was yielded."""
        while True:
            epoch, offset = divmod(self.position, self.per_epoch)
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for start in range(
                offset * self.micro_batch_size, self.per_epoch * self.micro_batch_size, self.micro_batch_size
            ):
                chunk = indices[start : start + self.micro_batch_size]
                self.position += 1
                yield self.collate([self.dataset[i] for i in chunk])
