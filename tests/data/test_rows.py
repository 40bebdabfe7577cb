"""Reading and normalizing the three data formats; every kind of bad row named by file and row."""

from __future__ import annotations

import copy
import json

import pytest

from dpo_lora.core.errors import UserError
from dpo_lora.data.rows import collect_rows, normalize_row, shape_problems

from ..conftest import CHATML, SENTIMENT_TRAIN


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
    # The space stays with the completions, as the model saw it in pretraining (' blue').
    assert row["prompt"] == "\n\nHuman: sky colour?\n\nAssistant:"
    assert (row["chosen"], row["rejected"]) == (" blue", " black")


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


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "missing field", "missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong type or shape", "must be strings"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "wrong type or shape", "'prompt' must be"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty completion", "empty completion"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical completions", "are the same"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty prompt", "the prompt tokenizes to no tokens"),
    ({"chosen": "abc", "rejected": "xyz"}, "wrong type or shape", "share no prompt"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "caf\xe9"}', "undecodable bytes", "not UTF-8"),
    (b'{"prompt": "p", "chosen": ', "malformed JSON", "malformed JSON"),
    (b"[1, 2]", "not a JSON object", "not a JSON object"),
]


def write_lines(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


@pytest.mark.parametrize("row, reason, message", BAD_ROWS, ids=[r for _, r, _ in BAD_ROWS])
def test_each_bad_row_is_named_with_file_and_row_number(tmp_path, tiny_tokenizer, row, reason, message):
    path = write_lines(tmp_path / "pairs.jsonl", [GOOD, GOOD, row])
    with pytest.raises(UserError) as err:
        collect_rows(str(path), tiny_tokenizer, on_bad_rows="error")
    text = str(err.value)
    assert text.startswith(f"{path}: 1 bad row(s): row 3: ") and message in text and "\n" not in text


def test_skip_drops_bad_rows_and_reports_them_by_reason(tmp_path, tiny_tokenizer):
    rows = [GOOD] + [row for row, _, _ in BAD_ROWS] + [GOOD]
    path = write_lines(tmp_path / "pairs.jsonl", rows)
    good, report = collect_rows(str(path), tiny_tokenizer, on_bad_rows="skip")
    assert [r["row_index"] for r in good] == [0, len(rows) - 1]
    assert report["rows"] == len(rows) and report["kept"] == 2
    expected: dict[str, list[int]] = {}
    for number, (_, reason, _) in enumerate(BAD_ROWS, start=2):
        expected.setdefault(reason, []).append(number)
    assert report["dropped_rows"] == expected
    assert report["dropped"] == {reason: len(numbers) for reason, numbers in expected.items()}


def test_many_bad_rows_list_the_first_few_and_count_all(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 9)
    with pytest.raises(UserError, match=r"9 bad row\(s\).*row 5: .*\(and 4 more\)"):
        collect_rows(str(path), tiny_tokenizer, on_bad_rows="error")


def test_json_array_files_are_read_row_by_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([GOOD, {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(UserError, match="row 2: missing field 'rejected'"):
        collect_rows(str(path), tiny_tokenizer, on_bad_rows="error")


def test_jsonl_parquet_and_save_to_disk_folders_give_the_same_rows(tmp_path, tiny_tokenizer):
    import datasets

    from_jsonl, _ = collect_rows(str(SENTIMENT_TRAIN), tiny_tokenizer, on_bad_rows="error")
    raw = datasets.load_dataset("json", data_files=str(SENTIMENT_TRAIN), split="train")
    raw.to_parquet(str(tmp_path / "pairs.parquet"))
    raw.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "pairs.parquet", tmp_path / "saved"):
        assert collect_rows(str(source), tiny_tokenizer, on_bad_rows="error")[0] == from_jsonl


@pytest.mark.parametrize("source, message", [("missing.jsonl", "not found"), ("notes.txt", "unknown type")])
def test_unreadable_sources_are_user_errors(tmp_path, tiny_tokenizer, source, message):
    with pytest.raises(UserError, match=message):
        collect_rows(str(tmp_path / source), tiny_tokenizer, on_bad_rows="error")


def test_hh_completions_start_with_the_word_token_of_the_real_tokenizer():
    from transformers import AutoTokenizer

    from dpo_lora.data.tokenization import tokenize_pair

    from ..conftest import REPO

    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "SmolLM2-135M-Instruct")
    raw = {
        "chosen": "\n\nHuman: sky colour?\n\nAssistant: blue",
        "rejected": "\n\nHuman: sky colour?\n\nAssistant: black",
    }
    ids = tokenize_pair(normalize_row(raw, tokenizer), tokenizer, max_length=64, max_prompt_length=32)
    first = tokenizer.convert_ids_to_tokens(ids["chosen_ids"][:1])
    assert first == tokenizer.tokenize(" blue")[:1] == ["Ġblue"], "one word token, not a lone space"
    assert tokenizer.convert_ids_to_tokens(ids["prompt_ids"])[-1] != "Ġ"


OPENAI_ROW = {
    "input": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]},
    "preferred_output": [{"role": "assistant", "content": "Hello, friend."}],
    "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
}


def test_openai_dpo_rows_render_like_the_same_conversational_row(tiny_tokenizer):
    conversational = {
        "prompt": OPENAI_ROW["input"]["messages"],
        "chosen": OPENAI_ROW["preferred_output"],
        "rejected": OPENAI_ROW["non_preferred_output"],
    }
    assert normalize_row(OPENAI_ROW, tiny_tokenizer) == normalize_row(conversational, tiny_tokenizer)


def test_openai_dpo_rows_hand_their_tools_to_the_chat_template(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}" + CHATML
    tool = {"type": "function", "function": {"name": "lookup_weather", "parameters": {"type": "object"}}}
    row = {**OPENAI_ROW, "input": {**OPENAI_ROW["input"], "tools": [tool]}}
    normalized = normalize_row(row, tokenizer)
    assert normalized["prompt"].startswith("[tool lookup_weather]<|im_start|>system")
    assert normalized["chosen"].startswith("Hello, friend.")


def test_upload_shape_check_names_each_bad_row_without_a_tokenizer(tmp_path):
    rows = [
        OPENAI_ROW,
        {**OPENAI_ROW, "preferred_output": OPENAI_ROW["non_preferred_output"]},  # identical
        {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []},
        {k: v for k, v in OPENAI_ROW.items() if k != "non_preferred_output"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    path = tmp_path / "upload.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    count, problems = shape_problems(str(path))
    assert count == 6
    assert [number for number, _ in problems] == [2, 3, 4, 6]
    assert "identical completions" in problems[0][1]
    assert "input.messages" in problems[1][1]
    assert "missing field 'non_preferred_output'" in problems[2][1]
    assert "malformed JSON" in problems[3][1]


UNPAIRED = [
    {"prompt": "Q: two plus two?", "completion": " 4", "label": True},
    {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "go away"}],
     "label": False},
    {"prompt": "Q: the sky?", "completion": " blue", "label": True},
]  # fmt: skip


def test_unpaired_rows_carry_their_label_and_borrow_the_next_rows_completion(tmp_path, tiny_tokenizer):
    good, report = collect_rows(str(write_jsonl(tmp_path / "kto.jsonl", UNPAIRED)), tiny_tokenizer, "error")
    assert [r["label"] for r in good] == [True, False, True]
    assert good[1]["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and good[1]["chat"]
    assert [r["chosen"] for r in good] == [" 4", "go away<|im_end|>\n", " blue"]
    # Each row's mismatched completion (KTO's KL sample) is the next row's; the last takes the first's.
    assert [r["rejected"] for r in good] == ["go away<|im_end|>\n", " blue", " 4"]
    assert (report["desirable"], report["undesirable"]) == (2, 1)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([UNPAIRED[0], {"prompt": "p", "chosen": " a", "rejected": " b"}, UNPAIRED[2]], "row 2 is a pair"),
        ([UNPAIRED[0]], "at least 2"),
    ],
)
def test_unpaired_files_are_all_unpaired_and_hold_two_rows(tmp_path, tiny_tokenizer, rows, message):
    with pytest.raises(UserError, match=message):
        collect_rows(str(write_jsonl(tmp_path / "kto.jsonl", rows)), tiny_tokenizer, "error")


def test_an_unpaired_rows_label_must_be_a_boolean(tmp_path, tiny_tokenizer):
    rows = [UNPAIRED[0], {**UNPAIRED[2], "label": "yes"}]
    with pytest.raises(UserError, match="row 2: wrong type or shape: 'label' must be true or false"):
        collect_rows(str(write_jsonl(tmp_path / "kto.jsonl", rows)), tiny_tokenizer, "error")
    assert shape_problems(str(tmp_path / "kto.jsonl")) == (
        2,
        [(2, "wrong type or shape: 'label' must be true or false, got 'yes'")],
    )


def test_checking_a_large_jsonl_holds_a_row_at_a_time_not_the_file(tmp_path):
    """An upload's check (and training's read) of JSON lines: its peak Python memory stays a small
    fraction of the file (it read the whole file, and split it, before)."""
    import tracemalloc

    row = json.dumps({"prompt": "p" * 200, "chosen": "c " * 200, "rejected": "r " * 200})
    path = tmp_path / "big.jsonl"
    path.write_text((row + "\n") * 30000 + "not json\n")  # ~25 MB
    tracemalloc.start()
    try:
        count, problems = shape_problems(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 30001 and [n for n, _ in problems] == [30001] and "malformed JSON" in problems[0][1]
    assert peak < path.stat().st_size / 50, f"{peak} bytes at peak for a {path.stat().st_size}-byte file"
