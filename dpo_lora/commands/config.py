"""`dpo-lora config [CONFIG] [key=value ...]`: the resolved config, or `--list` every knob."""

from __future__ import annotations

from dpo_lora.core.config import dump_yaml, load_config
from dpo_lora.core.schema import describe


def run(args) -> int:
    if args.list:
        for key, default, help_text in describe():
            print(f"{key} = {default!r}  # {help_text}")
        return 0
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0
