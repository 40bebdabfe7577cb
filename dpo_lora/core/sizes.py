"""Sizes people type: '5GB', '500MiB', '1024' (bytes). A leaf: the CLI, export and the service share it."""

from __future__ import annotations

import re

from dpo_lora.core.errors import UserError


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB' -> 5 * 10**9 bytes (also KB, MB, TB, GiB, MiB, TiB, plain integers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"{flag}: cannot read {text!r} (use e.g. 5GB or 500MB)")
    unit = (match.group(2) or "B").upper()
    decimal = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    binary = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    factor = (decimal | binary)[unit]
    return int(float(match.group(1)) * factor)
