"""This rank's micro-batches, epoch after epoch, resumable at any micro-batch.

The order is DistributedSampler's (seeded, reshuffled per epoch, each rank a disjoint shard), or
the length-grouped one below, so a run with the same seed and global batch sees the same pairs
whatever the ranks. The position is the number of micro-batches consumed; restoring it continues
with exactly the next pair, none seen twice or skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


class LengthGroupedSampler:
    """DistributedSampler's contract (seeded per epoch, rank r takes positions r, r+W, ...), with
    an order in which each global batch (`group` consecutive positions) holds pairs of similar
    length: shuffle, sort within windows of `window` global batches by length, cut the windows
    into global batches and shuffle those. Less padding; the pairs of a step still depend only on
    the seed and the global batch, not on how it is split over ranks."""

    def __init__(self, lengths: list[int], *, rank: int, world_size: int, seed: int, group: int, window: int = 64):
        self.lengths, self.rank, self.world_size, self.seed = lengths, rank, world_size, seed
        self.group, self.window = group, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) // self.world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.group * self.window
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [window[i : i + self.group] for i in range(0, len(window), self.group)]
        full = [batch for batch in batches if len(batch) == self.group]
        rest = [index for batch in batches if len(batch) < self.group for index in batch]  # last, so steps stay aligned
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        order = ([index for batch in shuffled for index in batch] + rest)[: len(self) * self.world_size]
        return iter(order[self.rank :: self.world_size])


class PairBatches:
    def __init__(
        self,
        dataset,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        collate: Callable | None,
        lengths: list[int] | None = None,
        global_batch: int = 0,
    ):
        """`lengths` (tokens per pair) and `global_batch` turn on length-grouped global batches."""
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.collate = collate
        if lengths is not None:
            self.sampler = LengthGroupedSampler(
                lengths, rank=rank, world_size=world_size, seed=seed, group=global_batch
            )
        else:
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


def pair_lengths(dataset) -> list[int]:
    """Padded width of each pair's sequences: prompt plus its longer completion."""
    columns = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    return [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in columns]
