"""Loading and normalizing the three data formats; bad rows named by file and row."""

from __future__ import annotations

import json

import pytest

from dpo_lora.config import DataConfig
from dpo_lora.data import check_rows, load_rows, normalize_row, prepare_splits
from dpo_lora.errors import UserError

from .conftest import SENTIMENT_EVAL, SENTIMENT_TRAIN


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_strings(tiny_tokenizer):
    row = normalize_row({"prompt": "Q: two plus two?", "chosen": " 4", "rejected": " 5"}, tiny_tokenizer)
    assert row == {"prompt": "Q: two plus two?", "chosen": " 4", "rejected": " 5", "chat": False}


def test_conversational_rendered_with_chat_template(tiny_tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    row = normalize_row(
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"}, tiny_tokenizer
    )
    assert row["chat"] is True
    assert row["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert row["chosen"] == "hello<|im_end|>\n" and row["rejected"] == "go away<|im_end|>\n"


def test_anthropic_hh_strings_split_at_shared_prefix_on_a_word_boundary(tiny_tokenizer):
    row = normalize_row(
        {
            "chosen": "\n\nHuman: sky colour?\n\nAssistant: blue",
            "rejected": "\n\nHuman: sky colour?\n\nAssistant: black",
        },
        tiny_tokenizer,
    )
    assert row["prompt"] == "\n\nHuman: sky colour?\n\nAssistant: "
    assert (row["chosen"], row["rejected"]) == ("blue", "black")


def test_anthropic_hh_message_lists(tiny_tokenizer):
    user = {"role": "user", "content": "hi"}
    row = normalize_row(
        {
            "chosen": [user, {"role": "assistant", "content": "hello"}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        },
        tiny_tokenizer,
    )
    assert row["prompt"].endswith("<|im_start|>assistant\n") and row["chosen"].startswith("hello")


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "must be strings"),
        ({"prompt": 7, "chosen": "a", "rejected": "b"}, "'prompt' must be"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty completion"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
        ({"chosen": "abc", "rejected": "xyz"}, "share no prompt"),
    ],
)
def test_bad_rows_are_named_with_file_and_row_number(tmp_path, tiny_tokenizer, row, problem):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, row])
    with pytest.raises(UserError) as err:
        check_rows(load_rows(str(path)), str(path), tiny_tokenizer)
    assert str(path) in str(err.value) and "row 3" in str(err.value) and problem in str(err.value)


def test_many_bad_rows_list_the_first_few_and_count_all(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 9)
    with pytest.raises(UserError, match=r"9 bad row\(s\).*row 5: .*\(and 4 more\)"):
        check_rows(load_rows(str(path)), str(path), tiny_tokenizer)


def test_loads_jsonl_parquet_and_save_to_disk_folders(tmp_path):
    rows = load_rows(str(SENTIMENT_TRAIN))
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    rows.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "pairs.parquet", tmp_path / "saved"):
        assert load_rows(str(source))[5] == rows[5]


@pytest.mark.parametrize("source, message", [("missing.jsonl", "not found"), ("notes.txt", "unknown type")])
def test_unreadable_sources_are_user_errors(tmp_path, source, message):
    with pytest.raises(UserError, match=message):
        load_rows(str(tmp_path / source))


def test_malformed_json_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(UserError, match="broken.jsonl"):
        load_rows(str(path))


def test_prepare_splits_with_eval_file_and_with_eval_fraction(tiny_tokenizer):
    config = DataConfig(train=str(SENTIMENT_TRAIN), eval=str(SENTIMENT_EVAL), max_length=64, max_prompt_length=48)
    train, held_out = prepare_splits(config, tiny_tokenizer, seed=0)
    assert (len(train), len(held_out)) == (320, 64)
    assert set(train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids", "row_index"}
    config = DataConfig(train=str(SENTIMENT_TRAIN), eval_fraction=0.25, max_length=64, max_prompt_length=48)
    train, held_out = prepare_splits(config, tiny_tokenizer, seed=0)
    assert (len(train), len(held_out)) == (240, 80)
    assert not set(train["row_index"]) & set(held_out["row_index"])
