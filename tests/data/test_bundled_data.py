"""The bundled task (data/sentiment/) is what its generator says: SmolLM2's own samples, labelled
by the judge the demo scores with, with held-out prompts never seen in training."""

from __future__ import annotations

import json

import pytest

from ..conftest import REPO

DATA = REPO / "data" / "sentiment"


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def test_every_pair_is_labelled_by_the_scorer_with_a_real_gap():
    from data.make_sentiment import MIN_GAP
    from data.sentiment_scorer import score

    for split in ("train", "eval"):
        pairs = rows(split)
        assert len(pairs) >= (150 if split == "train" else 40), split
        for number, pair in enumerate(pairs, start=1):
            chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
            assert score(chosen) - score(rejected) >= MIN_GAP - 1e-9, (split, number, chosen, rejected)


def test_held_out_prompts_are_new_and_completions_are_not_templated():
    train_prompts = {pair["prompt"][0]["content"] for pair in rows("train")}
    eval_prompts = {pair["prompt"][0]["content"] for pair in rows("eval")}
    assert not train_prompts & eval_prompts
    completions = [pair[key][0]["content"] for pair in rows("train") for key in ("chosen", "rejected")]
    assert len(set(completions)) == len(completions), "sampled text does not repeat (the old templates did)"


@pytest.mark.parametrize(("text", "sign"), [("A wonderful, moving film.", 1), ("Dull, clumsy and far too long.", -1)])
def test_the_scorer_reads_sentiment(text, sign):
    from data.sentiment_scorer import score

    assert score(text) * sign > 0.3
