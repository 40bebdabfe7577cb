"""What a run wrote, read without importing the trainer (its layout is dpo_lora/core/rundir.py's):
new metrics rows, the last error line of its log, a piece of its log, and the metrics as a results CSV."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from pathlib import Path

from dpo_lora.core.rundir import ERROR_PREFIX, METRICS, RANK_PREFIX, RowKind, row_kind

PROGRESS = re.compile(r"\d+%\|.*\||\|\s*\d+/\d+\s*\[")
EXCEPTION = re.compile(
    r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b"
)  # "ValueError: ...", "torch.OutOfMemoryError"


def new_rows(metrics_file: Path, offset: int, last_line: str = "") -> tuple[list[dict], int, str]:
    """Complete rows appended since byte `offset`, the new offset and the last line read.

    A resumed run rewrites the file from its checkpoint on (rows after it are written again, with
    new timings), possibly past the old offset before the next read. So unless the file still holds
    `last_line` just before `offset`, it is read again from the start; callers drop rows they have.
    """
    try:
        with open(metrics_file, "rb") as handle:
            tail = last_line.encode()
            handle.seek(max(offset - len(tail), 0))
            if offset and handle.read(len(tail)) != tail:
                offset = 0
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], 0, ""
    complete = data[: data.rfind(b"\n") + 1]  # a row still being written waits for the next read
    rows = []
    for line in complete.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not complete:
        return rows, offset, last_line if offset else ""
    newest = complete.rstrip(b"\n").rsplit(b"\n", 1)[-1] + b"\n"
    return rows, offset + len(complete), newest.decode()


def is_progress_line(line: str) -> bool:
    """A tqdm bar ("Training:  40%|####  | 4/10 [00:02<00:03, 1.9it/s]"): never an error message."""
    return PROGRESS.search(line) is not None


def last_error(log_file: Path, returncode: int | None = None, limit: int = 500) -> str:
    """The trainer's one-line error from its log, else the last line that reads like an exception,
    else its last line, else the exit status; never a progress bar."""
    try:
        text = Path(log_file).read_text(errors="replace")
    except FileNotFoundError:
        return "the run wrote no log"
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    lines = [line for line in lines if not is_progress_line(line) and not line.startswith("=== attempt")]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX) :][:limit]
        if line.startswith(RANK_PREFIX):
            return line[len("dpo-lora: ") :][:limit]
    for line in reversed(lines):
        if EXCEPTION.match(line):
            return line[:limit]
    if lines:
        return lines[-1][:limit]
    status = f"exit status {returncode}" if returncode is not None else "no exit status"
    return f"the run ended with {status} and no error message (see the job's run.log)"


def log_piece(log_file: Path, after: int | None, limit: int = 65536) -> dict:
    """Up to `limit` bytes of a log from byte `after` (None: its last `limit` bytes), as text.
    {"from", "offset" (where the next piece starts), "size", "text"}; a character cut by the limit
    is left for the next piece, so pieces join to the log's text."""
    size = log_file.stat().st_size if log_file.is_file() else 0
    start = max(size - limit, 0) if after is None else min(after, size)
    data = b""
    if start < size:
        with open(log_file, "rb") as handle:
            handle.seek(start)
            data = handle.read(limit)
    if after is None and start > 0:  # a tail starts mid-line: from its next line on
        cut = data.find(b"\n") + 1
        start, data = start + cut, data[cut:]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(data, final=False)  # holds back a character's first bytes
    return {"from": start, "offset": start + len(data) - len(decoder.getstate()[0]), "size": size, "text": text}


def results_csv(metrics_file: Path) -> bytes:
    """Every training and eval row of the run as CSV (the job's result file), by step."""
    rows, _, _ = new_rows(metrics_file, 0)
    rows = [row for row in rows if row_kind(row) in (RowKind.TRAIN, RowKind.EVAL)]
    columns = ["step"] + sorted({key for row in rows for key in row} - {"step"})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


TAIL_BYTES = 64 * 1024  # the newest training row is read from the end of metrics.jsonl


def newest_training_row(metrics_file: Path) -> dict | None:
    """The last training row, read from the file's tail (the file may be large)."""
    try:
        with open(metrics_file, "rb") as handle:
            handle.seek(max(handle.seek(0, 2) - TAIL_BYTES, 0))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the row being written, or a partial first line of the tail
        if row_kind(row) == RowKind.TRAIN:
            return row
    return None


def progress(run_dir: Path, running: bool) -> dict | None:
    """{step, total_steps, pairs_per_s, eta_seconds, estimated_finish} from the run's newest training
    row: the pairs left over the pairs/s measured in its window, counted from when the row was
    written (the file's modification time), so the figure holds still between rows. The job's
    `estimated_finish` and the dashboard's ETA are both this."""
    metrics_file = Path(run_dir) / METRICS
    row = newest_training_row(metrics_file)
    if row is None or "total_steps" not in row:
        return None
    remaining_pairs = (row["total_steps"] - row["step"]) * row["global_batch"]
    eta = remaining_pairs / row["pairs_per_s"] if running and row["pairs_per_s"] > 0 else None
    try:
        written = metrics_file.stat().st_mtime
    except FileNotFoundError:
        return None
    return {
        "step": row["step"],
        "total_steps": row["total_steps"],
        "pairs_per_s": row["pairs_per_s"],
        "eta_seconds": round(eta) if eta is not None else None,
        "estimated_finish": round(written + eta) if eta is not None else None,
    }
