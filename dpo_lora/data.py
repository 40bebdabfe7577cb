"""Loading preference data with Hugging Face `datasets` and normalizing its three formats.

Accepted rows (the format is detected per row):
  (a) `prompt`, `chosen`, `rejected` strings;
  (b) conversational: `prompt` a list of chat messages, `chosen`/`rejected` lists of assistant
      messages (or strings), rendered with the tokenizer's chat template;
  (c) Anthropic-HH style: `chosen`/`rejected` full dialogues (strings or message lists) and no
      `prompt`; their shared prefix becomes the prompt.
Every row becomes `{"prompt": str, "chosen": str, "rejected": str, "chat": bool}`; `chat` marks
text rendered by a chat template (which carries its own special tokens).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dpo_lora.errors import UserError

MAX_LISTED_ERRORS = 5


def load_rows(source: str):
    """Load a dataset (a `datasets.Dataset`) from a local file, a save_to_disk folder, or the hub."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if path.is_dir():
            if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
                raise UserError(f"data folder {source} is not a datasets save_to_disk folder")
            loaded = datasets.load_from_disk(str(path))
        elif path.suffix in (".jsonl", ".json", ".parquet"):
            if not path.is_file():
                raise UserError(f"data file not found: {source}")
            builder = "parquet" if path.suffix == ".parquet" else "json"
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
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


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _as_assistant_messages(value: Any) -> list[dict] | None:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return value if _is_messages(value) else None


def _render_chat(tokenizer, prompt_messages: list[dict], completion_messages: list[dict]) -> tuple[str, str]:
    """Render prompt and completion with the chat template; the completion is the text the
    template adds after the prompt (with the generation prompt) when the reply is appended."""
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt_messages + completion_messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the full dialogue")
    return prompt_text, full_text[len(prompt_text) :]


def _split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two strings into (shared prompt, chosen rest, rejected rest), cutting the prompt back
    to the last whitespace so neither completion starts mid-word."""
    n = len(os.path.commonprefix([chosen, rejected]))
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_row(row: dict, tokenizer) -> dict:
    """One raw row -> {"prompt", "chosen", "rejected", "chat"}; ValueError says what is wrong."""
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
        if _is_messages(chosen) and _is_messages(rejected):
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

    if not _is_messages(prompt):  # (b) conversational
        raise ValueError("'prompt' must be a string or a list of {role, content} messages")
    chosen_messages, rejected_messages = _as_assistant_messages(chosen), _as_assistant_messages(rejected)
    if chosen_messages is None or rejected_messages is None:
        raise ValueError("'chosen' and 'rejected' must be strings or lists of {role, content} messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational rows need a tokenizer with a chat template")
    prompt_text, chosen_text = _render_chat(tokenizer, prompt, chosen_messages)
    _, rejected_text = _render_chat(tokenizer, prompt, rejected_messages)
    return {"prompt": prompt_text, "chosen": chosen_text, "rejected": rejected_text, "chat": True}


def check_rows(rows, source: str, tokenizer) -> None:
    """Raise one UserError listing the first bad rows (file and 1-based row number) and the count."""
    problems = []
    for index, row in enumerate(rows):
        try:
            normalized = normalize_row(row, tokenizer)
        except ValueError as err:
            problems.append(f"row {index + 1}: {err}")
            continue
        if not normalized["chosen"].strip() or not normalized["rejected"].strip():
            problems.append(f"row {index + 1}: empty completion")
        elif normalized["chosen"] == normalized["rejected"]:
            problems.append(f"row {index + 1}: 'chosen' and 'rejected' are identical")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_ERRORS])
        more = f" (and {len(problems) - MAX_LISTED_ERRORS} more)" if len(problems) > MAX_LISTED_ERRORS else ""
        raise UserError(f"{source}: {len(problems)} bad row(s): {listed}{more}")


SOURCE_ROW = "row_index"  # 0-based row of the source file, kept through splitting and tokenizing


def _tokenize_row(row: dict, *, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    from dpo_lora.tokenization import tokenize_pair

    ids = tokenize_pair(
        normalize_row(row, tokenizer), tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
    )
    return {**ids, SOURCE_ROW: row[SOURCE_ROW]}


def tokenize_rows(rows, tokenizer, data_config):
    """Normalize and tokenize every row (cached by `datasets` so a rerun starts fast)."""
    import functools

    fn = functools.partial(
        _tokenize_row,
        tokenizer=tokenizer,
        max_length=data_config.max_length,
        max_prompt_length=data_config.max_prompt_length,
    )
    return rows.map(fn, remove_columns=rows.column_names, num_proc=data_config.num_proc)


def _numbered(rows):
    if SOURCE_ROW in rows.column_names:
        rows = rows.remove_columns(SOURCE_ROW)
    return rows.add_column(SOURCE_ROW, list(range(len(rows))))


def prepare_splits(data_config, tokenizer, seed: int):
    """Load, check and tokenize the train and eval splits. Eval is None when there is none."""
    train_rows = _numbered(load_rows(data_config.train))
    check_rows(train_rows, data_config.train, tokenizer)
    eval_rows = None
    if data_config.eval:
        eval_rows = _numbered(load_rows(data_config.eval))
        check_rows(eval_rows, data_config.eval, tokenizer)
    elif data_config.eval_fraction > 0:
        split = train_rows.train_test_split(test_size=data_config.eval_fraction, seed=seed)
        train_rows, eval_rows = split["train"], split["test"]
    train_set = tokenize_rows(train_rows, tokenizer, data_config)
    eval_set = tokenize_rows(eval_rows, tokenizer, data_config) if eval_rows is not None else None
    return train_set, eval_set
