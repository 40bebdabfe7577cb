"""`dpo-lora eval`: what preference training changed, measured on held-out pairs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dpo_lora.core.distributed import DistInfo
from dpo_lora.core.errors import UserError
from dpo_lora.data.layout import batch_layout, to_device
from dpo_lora.data.prepare import tokenized_split
from dpo_lora.model import chunked_logps
from dpo_lora.train.reference import with_reference_logps
from dpo_lora.train.step import preference_step
from dpo_lora.train.trained import checkpoint_of, load_trained


def pair_report(model, pairs, collate, dpo_config, batch_size: int) -> dict:
    """Reward accuracy, margin, policy/reference log-probs and the sequence-level KL estimate on the
    chosen completions (mean of log pi(y_w|x) - log ref(y_w|x)), over every pair."""

    columns: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            features = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
            batch = to_device(collate(features), model.device)
            _, stats = preference_step(model, batch, dpo_config)
            for name, value in stats.items():
                columns.setdefault(name, []).append(value.double().cpu())
    s = {name: torch.cat(values) for name, values in columns.items()}
    beta = dpo_config.beta
    return {
        "pairs": len(pairs),
        "reward_accuracy": s["rewards/accuracies"].mean().item(),
        "mean_margin": s["rewards/margins"].mean().item(),
        "loss": s["loss"].mean().item(),
        "policy_logps_chosen": s["logps/chosen"].mean().item(),
        "policy_logps_rejected": s["logps/rejected"].mean().item(),
        "reference_logps_chosen": (s["logps/chosen"] - s["rewards/chosen"] / beta).mean().item(),
        "reference_logps_rejected": (s["logps/rejected"] - s["rewards/rejected"] / beta).mean().item(),
        # Not a KL estimate: the pairs are not samples of the policy (generate estimates the KL).
        "mean_chosen_logratio": (s["rewards/chosen"] / beta).mean().item(),
    }


def format_table(report: dict) -> str:
    width = max(len(k) for k in report)
    return "\n".join(
        f"{k:<{width}}  {v:>12.4f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>12}" for k, v in report.items()
    )


def evaluate_run(source: str, data: str | None = None, batch_size: int = 8, out: str | None = None) -> dict:
    """Evaluate a trained run on held-out pairs; writes the JSON report and returns it."""

    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, config = load_trained(source, Path(scratch))
    data = data or config.data.eval
    if not data:
        raise UserError("no held-out pairs: give --data FILE (the run had no data.eval)")
    pairs, _ = tokenized_split(data, tokenizer, config.data)
    # Scored as in training: prompt shared where the model allows, LM head on completions only.
    chunked_logps.install(model, config.train.logps_chunk_size)
    collate, _ = batch_layout(config, model, tokenizer.pad_token_id)
    if config.dpo.uses_reference:
        # The reference never changes: scored once per eval set and cached (as training's evals
        # are), so evaluating several checkpoints of a run costs one policy forward each.
        one_process = DistInfo(rank=0, local_rank=0, world_size=1, device=model.device)
        pairs = with_reference_logps(model, pairs, config, collate, one_process)
    report = {"data": data, **pair_report(model, pairs, collate, config.dpo, batch_size)}
    target = Path(out) if out else Path(source) / "eval.json"
    if target.parent.is_dir():
        target.write_text(json.dumps(report, indent=2))
    return report


def run(args) -> int:
    source = checkpoint_of(args.run, args.checkpoint) if args.checkpoint else args.run
    report = evaluate_run(source, data=args.data, batch_size=args.batch_size, out=args.out)
    print(format_table(report))
    return 0
