"""Tokenized splits: eval file or held-out fraction, the on-disk cache, and the bad-row report."""

from __future__ import annotations

import json

import pytest

import dpo_lora.data.prepare as prepare
from dpo_lora.core.schema import DataConfig

from ..conftest import SENTIMENT_EVAL, SENTIMENT_TRAIN


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LORA_CACHE", str(tmp_path / "cache"))


def test_eval_file_and_eval_fraction(tiny_tokenizer, own_cache):
    config = DataConfig(train=str(SENTIMENT_TRAIN), eval=str(SENTIMENT_EVAL), max_length=64, max_prompt_length=48)
    train, held_out = prepare.prepare_splits(config, tiny_tokenizer, seed=0)
    assert (len(train), len(held_out)) == (320, 64)
    assert set(train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated", "row_index"}
    config = DataConfig(train=str(SENTIMENT_TRAIN), eval_fraction=0.25, max_length=64, max_prompt_length=48)
    train, held_out = prepare.prepare_splits(config, tiny_tokenizer, seed=0)
    assert (len(train), len(held_out)) == (240, 80)
    assert not set(train["row_index"]) & set(held_out["row_index"])
    assert sorted([*train["row_index"], *held_out["row_index"]]) == list(range(320))


def test_second_run_reads_the_cache_and_changes_retokenize(tiny_tokenizer, own_cache, monkeypatch, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(SENTIMENT_TRAIN.read_text())
    config = DataConfig(train=str(data), max_length=64, max_prompt_length=48)
    first, _ = prepare.prepare_splits(config, tiny_tokenizer, seed=0)
    calls = []
    original = prepare.collect_rows
    monkeypatch.setattr(prepare, "collect_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    second, _ = prepare.prepare_splits(config, tiny_tokenizer, seed=0)
    assert calls == [] and second[:] == first[:]
    prepare.prepare_splits(DataConfig(train=str(data), max_length=32, max_prompt_length=16), tiny_tokenizer, seed=0)
    assert calls == [1], "a new max_length must re-tokenize"
    data.write_text(SENTIMENT_TRAIN.read_text().replace("wonderful", "marvellous"))
    prepare.prepare_splits(config, tiny_tokenizer, seed=0)
    assert calls == [1, 1], "changed data must re-tokenize"


def test_skipped_rows_are_written_to_the_data_report(tiny_tokenizer, own_cache, tmp_path):
    data = tmp_path / "pairs.jsonl"
    lines = SENTIMENT_TRAIN.read_text().splitlines()[:10]
    lines[3] = '{"prompt": "p", "chosen": "same", "rejected": "same"}'
    lines[6] = "{not json"
    data.write_text("\n".join(lines) + "\n")
    config = DataConfig(train=str(data), max_length=64, max_prompt_length=48, on_bad_rows="skip")
    train, _ = prepare.prepare_splits(config, tiny_tokenizer, seed=0, report_dir=tmp_path / "run")
    assert len(train) == 8 and 3 not in train["row_index"] and 6 not in train["row_index"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["dropped_rows"] == {"identical completions": [4], "malformed JSON": [7]}
    assert report["eval"] is None
    assert report["train"]["prompts_truncated"] == sum(train["prompt_truncated"])


def test_truncated_prompts_are_counted_in_the_data_report(tiny_tokenizer, own_cache, tmp_path):
    config = DataConfig(train=str(SENTIMENT_TRAIN), max_length=64, max_prompt_length=4)
    train, _ = prepare.prepare_splits(config, tiny_tokenizer, seed=0, report_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["prompts_truncated"] == sum(train["prompt_truncated"]) > 0
