"""`dpo-lora train CONFIG [key=value ...]`: train, then print the held-out before/after table."""

from __future__ import annotations

import os

from dpo_lora.core.config import load_config
from dpo_lora.train.loop import train


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _before_after_table(before: dict, after: dict) -> str:
    lines = [f"{'held-out metric':<26}{'before':>10}{'after':>10}"]
    for key in (
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/loss",
        "eval/logps/chosen",
        "eval/logps/rejected",
    ):
        lines.append(f"{key:<26}{before[key]:>10.4f}{after[key]:>10.4f}")
    return "\n".join(lines)


def run(args) -> int:
    overrides = list(args.overrides)
    if args.resume or args.force_resume:
        overrides.append(f"train.resume={'force' if args.force_resume else 'auto'}")
    if args.overwrite:
        overrides.append("overwrite=true")
    config = load_config(args.config, overrides)
    results = train(config)
    if _is_main_rank():
        if "before" in results and "after" in results:
            print(_before_after_table(results["before"], results["after"]))
        if not results["stopped"]:  # a stopped run said where its checkpoint is; it has no adapter yet
            print(f"dpo-lora: the adapter is in {config.output_dir}/adapter")
    return 0
