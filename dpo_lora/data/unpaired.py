"""Unpaired rows (KTO): `{prompt, completion, label}`, the prompt and completion as strings or
chat messages. Each becomes a pair-shaped row whose `chosen` is its completion and whose
`rejected`, filled once the whole file is read, is the next row's completion: the mismatched
pair KTO's KL reference point is estimated on."""

from __future__ import annotations

from dpo_lora.core.errors import UserError
from dpo_lora.data.chat import as_assistant_messages, is_messages, render_chat

UNPAIRED_KEYS = ("completion", "label")


def normalize_unpaired(row: dict, tokenizer) -> dict:
    """(e) -> {"prompt", "chosen": the completion, "rejected": "" (filled by pair_unpaired), "chat", "label"}."""
    for key in ("prompt", *UNPAIRED_KEYS):
        if row.get(key) is None:
            raise ValueError(f"missing field '{key}'")
    prompt, completion, label = row["prompt"], row["completion"], row["label"]
    if not isinstance(label, bool):
        raise ValueError(f"'label' must be true or false, got {label!r}")
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise ValueError("with a string 'prompt', 'completion' must be a string")
        return {"prompt": prompt, "chosen": completion, "rejected": "", "chat": False, "label": label}
    messages = as_assistant_messages(completion)
    if not is_messages(prompt) or messages is None:
        raise ValueError("'prompt' and 'completion' must be strings or lists of {role, content} messages")
    if tokenizer is None:
        return {"prompt": prompt, "chosen": messages, "rejected": "", "chat": True, "label": label}
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational rows need a tokenizer with a chat template")
    prompt_text, completion_text = render_chat(tokenizer, prompt, messages)
    return {"prompt": prompt_text, "chosen": completion_text, "rejected": "", "chat": True, "label": label}


def pair_unpaired(source: str, rows: list[dict], row_number) -> bool:
    """Whether the rows are unpaired; if so, give each the next row's completion as its mismatched
    one (the last takes the first's). A file mixing pairs and unpaired rows is refused, naming the
    first row of the minority kind."""
    kinds = ["label" in row for row in rows]
    if all(kinds) != any(kinds):
        odd = next(row for row, kind in zip(rows, kinds, strict=True) if kind != (sum(kinds) * 2 > len(kinds)))
        raise UserError(
            f"{source}: row {row_number(odd)} is {'unpaired' if 'label' in odd else 'a pair'} while most rows are "
            f"not: a file holds pairs (prompt, chosen, rejected) or unpaired rows (prompt, completion, label)"
        )
    if not kinds[0]:
        return False
    if len(rows) < 2:
        raise UserError(f"{source}: unpaired rows need at least 2 (each borrows another's completion for KTO's KL)")
    for row, other in zip(rows, rows[1:] + rows[:1], strict=True):
        row["rejected"] = other["chosen"]
    return True
