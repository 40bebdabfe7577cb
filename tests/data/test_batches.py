"""The resumable batch stream: same order after a restore, disjoint shards, one pass per epoch."""

from __future__ import annotations

import itertools

from dpo_lora.data.batches import PairBatches


def ids(batch: list[dict]) -> list[int]:
    return [row["i"] for row in batch]


def stream(rank=0, world=1, position=0, n=23, micro=3, seed=7):
    batches = PairBatches(
        [{"i": i} for i in range(n)], micro_batch_size=micro, rank=rank, world_size=world, seed=seed, collate=ids
    )
    batches.position = position
    return batches


def test_restored_position_continues_with_exactly_the_next_batches():
    uninterrupted = list(itertools.islice(iter(stream()), 20))  # crosses two epoch boundaries
    for k in (0, 4, 7, 13):
        resumed = stream(position=k)
        assert list(itertools.islice(iter(resumed), 20 - k)) == uninterrupted[k:]
        assert resumed.position == 20


def test_each_epoch_sees_every_pair_at_most_once_and_reshuffles():
    batches = stream()
    per_epoch = batches.per_epoch
    first = list(itertools.islice(iter(stream()), 2 * per_epoch))
    epoch0, epoch1 = sum(first[:per_epoch], []), sum(first[per_epoch:], [])
    assert len(set(epoch0)) == len(epoch0) == per_epoch * 3
    assert epoch0 != epoch1


def test_ranks_get_disjoint_shards_covering_the_global_batches():
    one_rank = sum(itertools.islice(iter(stream(world=1, micro=4, n=24)), 3), [])
    two_ranks = [sum(itertools.islice(iter(stream(rank=r, world=2, micro=2, n=24)), 3), []) for r in (0, 1)]
    assert not set(two_ranks[0]) & set(two_ranks[1])
    # Same seed and global batch: the pairs of each optimizer step agree with one rank's.
    for step in range(3):
        assert sorted(one_rank[4 * step : 4 * step + 4]) == sorted(
            two_ranks[0][2 * step : 2 * step + 2] + two_ranks[1][2 * step : 2 * step + 2]
        )


def grouped(rank=0, world=1, micro=2, n=200, seed=3, global_batch=8):
    lengths = [(i * 37) % 101 + 5 for i in range(n)]  # spread-out lengths in a scrambled order
    batches = PairBatches(
        [{"i": i} for i in range(n)], micro_batch_size=micro, rank=rank, world_size=world, seed=seed, collate=ids,
        lengths=lengths, global_batch=global_batch,
    )  # fmt: skip
    return batches, lengths


def test_length_grouping_cuts_padding_and_keeps_every_invariant():
    batches, lengths = grouped()
    micro_batches = list(itertools.islice(iter(batches), 2 * batches.per_epoch))
    steps = [sum(micro_batches[k : k + 4], []) for k in range(0, len(micro_batches), 4)]  # 4 micro = 1 step
    per_epoch_steps = batches.per_epoch // 4
    epoch0 = sum(steps[:per_epoch_steps], [])
    assert len(set(epoch0)) == len(epoch0) == 200  # every pair once per epoch
    assert epoch0 != sum(steps[per_epoch_steps:], [])  # reshuffled per epoch

    def padding(step_ids):  # padded tokens of a global batch
        return sum(max(lengths[i] for i in step_ids) - lengths[i] for i in step_ids)

    random_batches = stream(n=200, micro=8, seed=3)
    random_steps = list(itertools.islice(iter(random_batches), per_epoch_steps))
    assert sum(map(padding, steps[:per_epoch_steps])) * 5 < sum(map(padding, random_steps))

    # Ranks: disjoint, and the pairs of each step are the same whatever the split.
    two = [grouped(rank=r, world=2, micro=2)[0] for r in (0, 1)]
    streams = [list(itertools.islice(iter(b), 2 * b.per_epoch)) for b in two]
    for step in range(per_epoch_steps):
        split = sum(streams[0][2 * step : 2 * step + 2] + streams[1][2 * step : 2 * step + 2], [])
        assert sorted(split) == sorted(steps[step])

    resumed, _ = grouped()
    resumed.position = 13
    assert list(itertools.islice(iter(resumed), 20)) == list(itertools.islice(iter(grouped()[0]), 33))[13:]
