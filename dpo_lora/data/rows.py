"""Reading preference data, checking every row, and normalizing its five formats.

Accepted rows (the format is detected per row):
  (a) `prompt`, `chosen`, `rejected` strings;
  (b) conversational: `prompt` a list of chat messages, `chosen`/`rejected` lists of assistant
      messages (or strings), rendered with the tokenizer's chat template;
  (c) Anthropic-HH style: `chosen`/`rejected` full dialogues (strings or message lists) and no
      `prompt`; their shared prefix becomes the prompt;
  (d) OpenAI's DPO fine-tuning rows: `input.messages` (+ optional `input.tools`), `preferred_output`
      and `non_preferred_output` lists of assistant messages; rendered like (b), tools included;
  (e) unpaired (KTO): `prompt`, `completion` and `label` (true: desirable), the prompt and
      completion as strings or as messages like (b).
Every row becomes `{"prompt": str, "chosen": str, "rejected": str, "chat": bool}`; `chat` marks
text rendered by a chat template (which carries its own special tokens). An unpaired row also has
`label`; its `chosen` is its completion and its `rejected`, filled once the file is read, the next
row's completion (the mismatched pair KTO's KL estimate reads; dpo_lora.data.unpaired). A file is
all pairs or all unpaired. JSON files are parsed line by line here so that one malformed,
undecodable or mistyped row is reported by its number instead of failing the whole file inside
Arrow; other sources are loaded with Hugging Face `datasets`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpo_lora.core.errors import UserError
from dpo_lora.data.chat import as_assistant_messages, is_messages, render_chat
from dpo_lora.data.unpaired import UNPAIRED_KEYS, normalize_unpaired, pair_unpaired

MAX_LISTED_ERRORS = 5
SOURCE_ROW = "row_index"  # 0-based row of the source file, kept through checking, splitting and tokenizing


def load_rows(source: str):
    """Load a `datasets.Dataset` from a local .parquet file, a save_to_disk folder, or the hub."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if path.is_dir():
            if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
                raise UserError(f"data folder {source} is not a datasets save_to_disk folder")
            loaded = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet":
            if not path.is_file():
                raise UserError(f"data file not found: {source}")
            loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif path.suffix or "/" not in source or source.startswith((".", "/")):
            raise UserError(
                f"data file not found or of unknown type: {source} (use .jsonl, .json, .parquet or a folder)"
            )
        else:
            loaded = datasets.load_dataset(source, split="train")
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for unreadable input
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read data {source}: {first_line}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"data folder {source} holds splits {list(loaded)}, expected one named 'train'")
        loaded = loaded["train"]
    return loaded


def _split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two strings into (shared prompt, chosen rest, rejected rest), cutting the prompt back
    to the last whitespace so neither completion starts mid-word."""
    n = len(os.path.commonprefix([chosen, rejected]))
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    # The whitespace goes with the completions, where the tokenizer joins it to the first word
    # (' blue' is one token; a prompt ending in ' ' gives a lone space token, off-distribution).
    while n > 0 and chosen[n - 1] in " \t":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")


def _from_openai_row(row: dict) -> tuple[dict, list | None]:
    """(d) -> a conversational row (b) and its tools."""
    for key in OPENAI_KEYS:
        if row.get(key) is None:
            raise ValueError(f"missing field '{key}'")
    source = row["input"]
    if not isinstance(source, dict) or not is_messages(source.get("messages")) or not source["messages"]:
        raise ValueError("'input.messages' must be a non-empty list of {role, content} messages")
    tools = source.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("'input.tools' must be a list of tool objects")
    for key in OPENAI_KEYS[1:]:
        if not is_messages(row[key]) or not row[key]:
            raise ValueError(f"'{key}' must be a non-empty list of {{role, content}} messages")
    return {"prompt": source["messages"], "chosen": row[OPENAI_KEYS[1]], "rejected": row[OPENAI_KEYS[2]]}, tools


def normalize_row(row: dict, tokenizer) -> dict:
    """One raw row -> {"prompt", "chosen", "rejected", "chat"} (+ "label" when unpaired); ValueError
    says what is wrong.

    With `tokenizer=None` only the shape is checked: conversational rows come back as unrendered
    message lists (what an upload is checked with before any model is chosen)."""
    if any(key in row for key in UNPAIRED_KEYS):
        return normalize_unpaired(row, tokenizer)
    tools = None
    if any(key in row for key in OPENAI_KEYS):
        row, tools = _from_openai_row(row)
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise ValueError(f"missing field '{key}'")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]

    if prompt is None:  # (c) full dialogues
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
            if not prompt:
                raise ValueError("'chosen' and 'rejected' share no prompt prefix")
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chat": False}
        if is_messages(chosen) and is_messages(rejected):
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                raise ValueError("'chosen' and 'rejected' dialogues share no prompt messages")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            raise ValueError("'chosen' and 'rejected' must both be strings or both be message lists")

    if isinstance(prompt, str):  # (a) plain strings
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError("with a string 'prompt', 'chosen' and 'rejected' must be strings")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chat": False}

    if not is_messages(prompt):  # (b) conversational
        raise ValueError("'prompt' must be a string or a list of {role, content} messages")
    chosen_messages, rejected_messages = as_assistant_messages(chosen), as_assistant_messages(rejected)
    if chosen_messages is None or rejected_messages is None:
        raise ValueError("'chosen' and 'rejected' must be strings or lists of {role, content} messages")
    if tokenizer is None:
        return {"prompt": prompt, "chosen": chosen_messages, "rejected": rejected_messages, "chat": True}
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational rows need a tokenizer with a chat template")
    prompt_text, chosen_text = render_chat(tokenizer, prompt, chosen_messages, tools)
    _, rejected_text = render_chat(tokenizer, prompt, rejected_messages, tools)
    return {"prompt": prompt_text, "chosen": chosen_text, "rejected": rejected_text, "chat": True}


class BadRow(ValueError):
    """A row that cannot be trained on; `reason` is the category counted in the data report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail if detail.startswith(reason) else f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _json_rows(path: Path):
    """Yield (row number, row dict or BadRow) for a .jsonl file, or a .json array / JSON-lines file.
    JSON lines are read a line at a time (an upload's check holds one row, not the file); a JSON
    array is parsed whole."""
    if path.suffix == ".json" and _first_byte(path) == b"[":
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: not a valid JSON array: {err}") from None
        except RecursionError:
            raise UserError(f"{path}: not a valid JSON array: nested too deeply") from None
        for number, row in enumerate(rows, start=1):
            yield number, row if isinstance(row, dict) else BadRow("not a JSON object")
        return
    with path.open("rb") as lines:
        yield from _json_lines(lines)


def _first_byte(path: Path) -> bytes:
    """The file's first byte that is not whitespace (b"" for none)."""
    with path.open("rb") as handle:
        while chunk := handle.read(65536):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


def _json_lines(lines):
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield number, BadRow("undecodable bytes", f"not UTF-8 at byte {err.start}")
            continue
        except json.JSONDecodeError as err:
            yield number, BadRow("malformed JSON", err.msg)
            continue
        except RecursionError:
            yield number, BadRow("malformed JSON", "nested too deeply")
            continue
        yield number, row if isinstance(row, dict) else BadRow("not a JSON object")


def read_rows(source: str):
    """Yield (1-based row number, raw row dict or BadRow) from any supported source."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and not path.is_dir():
        if not path.is_file():
            raise UserError(f"data file not found: {source}")
        yield from _json_rows(path)
    else:
        yield from enumerate(load_rows(source), start=1)


def check_row(row: dict, tokenizer) -> dict:
    """normalize_row plus the checks on its result; raises BadRow."""
    normalized = _normalized_or_bad(row, tokenizer)
    unpaired = "label" in normalized
    if not normalized["chosen"].strip() or not (unpaired or normalized["rejected"].strip()):
        raise BadRow("empty completion")
    if not unpaired and normalized["chosen"] == normalized["rejected"]:
        raise BadRow("identical completions", "'chosen' and 'rejected' are the same")
    if not tokenizer(normalized["prompt"], add_special_tokens=not normalized["chat"])["input_ids"]:
        # Nothing would predict the first completion token (this tokenizer adds no BOS).
        raise BadRow("empty prompt", "the prompt tokenizes to no tokens")
    return normalized


def _normalized_or_bad(row: dict, tokenizer) -> dict:
    try:
        return normalize_row(row, tokenizer)
    except BadRow:
        raise
    except ValueError as err:
        reason = "missing field" if str(err).startswith("missing field") else "wrong type or shape"
        raise BadRow(reason, str(err)) from None


def check_row_shape(row: dict) -> None:
    """The row checks that need no tokenizer; raises BadRow."""
    normalized = _normalized_or_bad(row, None)
    unpaired = "label" in normalized
    texts = [
        "".join(m["content"] for m in value) if isinstance(value, list) else value
        for value in (normalized["chosen"], normalized["rejected"])
    ]
    if not texts[0].strip() or not (unpaired or texts[1].strip()):
        raise BadRow("empty completion")
    if not unpaired and normalized["chosen"] == normalized["rejected"]:
        raise BadRow("identical completions", "'chosen' and 'rejected' are the same")


def shape_problems(source: str) -> tuple[int, list[tuple[int, str]]]:
    """(rows read, [(1-based row number, what is wrong)]) of a JSON/JSONL file, without a tokenizer."""
    rows, problems = 0, []
    for number, row in read_rows(source):
        rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            check_row_shape(row)
        except BadRow as err:
            problems.append((number, str(err)))
    return rows, problems


def collect_rows(source: str, tokenizer, on_bad_rows: str) -> tuple[list[dict], dict]:
    """Normalized rows (with their 0-based `row_index`) and a report of the bad ones.

    With on_bad_rows="error", any bad row raises one UserError naming the file, the first bad
    rows and the count; with "skip" they are dropped and listed in the report.
    """
    good, bad = [], []
    for number, row in read_rows(source):
        try:
            if isinstance(row, BadRow):
                raise row
            good.append({**check_row(row, tokenizer), SOURCE_ROW: number - 1})
        except BadRow as err:
            bad.append((number, err.reason, str(err)))
    if bad and on_bad_rows == "error":
        listed = "; ".join(f"row {n}: {text}" for n, _, text in bad[:MAX_LISTED_ERRORS])
        more = f" (and {len(bad) - MAX_LISTED_ERRORS} more)" if len(bad) > MAX_LISTED_ERRORS else ""
        raise UserError(f"{source}: {len(bad)} bad row(s): {listed}{more}; fix them or set data.on_bad_rows=skip")
    if not good:
        raise UserError(f"{source}: no usable rows")
    unpaired = pair_unpaired(source, good, row_number=lambda row: row[SOURCE_ROW] + 1)
    by_reason: dict[str, list[int]] = {}
    for number, reason, _ in bad:
        by_reason.setdefault(reason, []).append(number)
    report = {
        "source": source,
        "rows": len(good) + len(bad),
        "kept": len(good),
        "dropped": {reason: len(numbers) for reason, numbers in by_reason.items()},
        "dropped_rows": by_reason,
    }
    if unpaired:
        report["desirable"] = sum(row["label"] for row in good)
        report["undesirable"] = len(good) - report["desirable"]
    return good, report
