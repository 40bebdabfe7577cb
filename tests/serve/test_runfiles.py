"""Reading what a run writes while it writes it."""

from __future__ import annotations

import json

from dpo_lora.serve.runfiles import last_error, log_piece, new_rows, results_csv


def test_new_rows_waits_for_a_complete_line_and_rereads_a_rewritten_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n" + '{"step": 2, "lo')
    rows, offset, last = new_rows(metrics, 0)
    assert rows == [{"step": 1, "loss": 0.7}]
    with metrics.open("a") as handle:
        handle.write('ss": 0.6}\n')
    rows, offset, last = new_rows(metrics, offset, last)
    assert rows == [{"step": 2, "loss": 0.6}] and offset == metrics.stat().st_size
    assert new_rows(metrics, offset, last) == ([], offset, last)
    # A resume truncated the file to step 1 and has already written more than was read before.
    rewritten = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6, "pairs_per_s": 3.1}, {"step": 3, "loss": 0.5}]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rewritten))
    assert metrics.stat().st_size > offset
    rows, _, _ = new_rows(metrics, offset, last)
    assert rows == rewritten  # read again from the start (the caller skips steps it has)
    assert new_rows(tmp_path / "missing.jsonl", 5, "x") == ([], 0, "")


def test_last_error_is_the_trainers_one_line_error(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("loading\ndpo-lora: error: data.jsonl: 2 bad row(s)\nTraceback? no\n")
    assert last_error(log) == "data.jsonl: 2 bad row(s)"
    log.write_text("something\nKilled\n")
    assert last_error(log) == "Killed"


def test_results_csv_has_every_train_and_eval_row(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/loss": 0.69}, {"step": 1, "loss": 0.7, "lr": 1e-4}, {"step": 1, "checkpoint": "x"}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert results_csv(metrics).decode().splitlines() == ["step,eval/loss,loss,lr", "0,0.69,,", "1,,0.7,0.0001"]


def test_last_error_is_never_a_progress_bar(tmp_path):
    log = tmp_path / "run.log"
    bar = "Training:  40%|####      | 4/10 [00:02<00:03,  1.90it/s]"
    log.write_text(f"loading\nValueError: the tokenizer has no chat template\n{bar}\r{bar}\n")
    assert last_error(log) == "ValueError: the tokenizer has no chat template"
    log.write_text(f"=== attempt 1: python -m dpo_lora train\n{bar}\r{bar}\r\n")
    assert last_error(log, -11) == "the run ended with exit status -11 and no error message (see the job's run.log)"


def test_log_pieces_join_to_the_log_and_never_cut_a_character(tmp_path):
    log = tmp_path / "run.log"
    assert log_piece(log, None) == {"from": 0, "offset": 0, "size": 0, "text": ""}, "no log yet"
    text = "".join(f"line {i}: überprüft 日本\n" for i in range(400))
    log.write_bytes(text.encode())
    pieces, offset = [], 0
    while True:
        piece = log_piece(log, offset, limit=1000)
        assert piece["from"] == offset
        if piece["offset"] == offset:
            break
        assert "\ufffd" not in piece["text"], "a character cut at the limit waits for the next piece"
        pieces.append(piece["text"])
        offset = piece["offset"]
    assert "".join(pieces) == text and offset == len(text.encode()) and len(pieces) > 10
    tail = log_piece(log, None, limit=1000)
    assert tail["offset"] == tail["size"] == len(text.encode()) and text.endswith(tail["text"])
    assert tail["text"].startswith("line ") and len(tail["text"].encode()) <= 1000, "the tail starts at a line"
    beyond = log_piece(log, 10**9)
    assert (beyond["offset"], beyond["text"]) == (len(text.encode()), ""), "asking past the end waits there"
