"""`dpo-lora generate`: samples from the policy and the reference side by side (one model,
adapter on and off), scored by a user's reward function, with the KL estimate between them.
This is the DPO paper's reward-versus-KL comparison on the user's own task."""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import torch

from dpo_lora.core.errors import UserError
from dpo_lora.model.decode import adapter_arguments, adapter_groups
from dpo_lora.model.load import POLICY_ADAPTER, REFERENCE_ADAPTER, reference_mode
from dpo_lora.model.logprobs import IGNORE_INDEX, sequence_logps
from dpo_lora.train.trained import checkpoint_of, load_trained


def read_prompts(path: str, tokenizer) -> list[tuple[str, str]]:
    """(shown, rendered) prompts from a .txt file (one per line) or a .jsonl file with a `prompt`
    field (a string, used as is, or chat messages). Plain lines are user messages when the tokenizer
    has a chat template. `rendered` is what the model sees; `shown` is what a person wrote (the last
    user message of a chat), without the template's system prompt and special tokens."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts: file not found: {path}")
    chat = getattr(tokenizer, "chat_template", None)
    prompts = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}: row {number}: expected a JSON object with a 'prompt'") from None
        else:
            prompt = [{"role": "user", "content": line}] if chat else line
        shown = prompt
        if isinstance(prompt, list):
            users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            shown = users[-1] if users and isinstance(users[-1], str) else json.dumps(prompt)
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompts.append((shown, prompt))
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def load_reward(spec: str):
    """'package.module:function' -> the function (text -> float)."""
    import os
    import sys

    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:  # a console script does not look in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"--reward {spec}: cannot import it ({err})") from None


def completion_logps(model, prompt_mask: torch.Tensor, sequences: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Summed log-probs [b*n] of the generated part of `sequences` [b*n, P+G], whose first P
    tokens are the b left-padded prompts (`prompt_mask` [b, P], 1 on real tokens), n samples each."""

    prompt_length = prompt_mask.shape[1]
    generated = sequences[:, prompt_length:]
    # Past the first EOS a sample is padding; score up to and including it.
    after_eos = (generated == pad_id).long().cumsum(1) > (generated == pad_id).long()
    prompt_mask = prompt_mask.repeat_interleave(sequences.shape[0] // prompt_mask.shape[0], dim=0)
    attention = torch.cat([prompt_mask, (~after_eos).long()], dim=1)
    labels = sequences.clone()
    labels[:, :prompt_length] = IGNORE_INDEX
    labels[:, prompt_length:][after_eos] = IGNORE_INDEX
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # as generate() numbered them under left padding
    # Only the generated tokens are scored: the LM head runs on the last G + 1 positions (whose
    # logits predict them), not on the prompt's (a third of the head's work on the demo).
    keep = generated.shape[1] + 1
    with torch.no_grad():
        logits = model(
            input_ids=sequences, attention_mask=attention, position_ids=positions, logits_to_keep=keep
        ).logits
    return sequence_logps(logits, labels[:, -keep:])[0]


def sample_both(model, prompts: dict, n: int, **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` samples per prompt from the policy and from the reference, in one generate call: PEFT runs
    each row with its own adapter (policy rows: the adapter; reference rows: none, or the init
    adapter), so both share every decoding step (on the demo, half the sampling time of two calls).

    prompts: input_ids / attention_mask [b, P], left-padded. Returns two [b*n, P+G] tensors (G may
    differ between them when greedy).
    """

    reference = REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else "__base__"
    rows = {key: value.repeat_interleave(n, dim=0) for key, value in prompts.items()}
    count = rows["input_ids"].shape[0]
    with torch.no_grad():
        if len(adapter_groups(model, [POLICY_ADAPTER, reference])) > 1:  # DoRA runs only as the active adapter
            return tuple(_generate_as(model, name, rows, generate_kwargs) for name in (POLICY_ADAPTER, reference))
        if not generate_kwargs.get("do_sample", True):
            # Greedy: one call per side, so each answer is what the model gives its prompts alone
            # (batching the two sides changes the kernels' rounding, which can flip a near-tie).
            policy, ref = (model.generate(**rows, adapter_names=[name] * count, **generate_kwargs)
                           for name in (POLICY_ADAPTER, reference))  # fmt: skip
            return policy, ref
        both = {key: torch.cat([value, value]) for key, value in rows.items()}
        sequences = model.generate(
            **both, adapter_names=[POLICY_ADAPTER] * count + [reference] * count, **generate_kwargs
        )
    return sequences[:count], sequences[count:]


def _generate_as(model, name: str, rows: dict, generate_kwargs: dict) -> torch.Tensor:
    """`rows` generated by adapter `name` alone (the base for "__base__"); the policy active after."""
    try:
        with adapter_arguments(model, [name]) as adapters:
            return model.generate(**rows, **adapters, **generate_kwargs)
    finally:
        model.set_adapter(POLICY_ADAPTER)


def generate_run(
    source: str,
    prompts_file: str,
    *,
    n: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    reward: str | None = None,
    seed: int = 0,
    out: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Sample `n` completions per prompt from the policy and from the reference, `batch_size`
    prompts per generate call (left-padded); score them with `reward`; estimate KL(policy||ref)."""

    if not Path(prompts_file).is_file():  # before loading a model for nothing
        raise UserError(f"--prompts: file not found: {prompts_file}")
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, _ = load_trained(source, Path(scratch))
    reward_fn = load_reward(reward) if reward else None
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    shown_texts, texts = map(list, zip(*read_prompts(prompts_file, tokenizer), strict=True))
    rows, kl_terms, wins = [], [], []
    torch.manual_seed(seed)
    kwargs = dict(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        pad_token_id=eos,
        eos_token_id=eos,
        use_cache=True,
    )
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        prompts = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        mask = prompts["attention_mask"]
        policy_seqs, reference_seqs = sample_both(model, prompts, n, **kwargs)
        with reference_mode(model):
            reference_logps_of_policy = completion_logps(model, mask, policy_seqs, eos)
        # Samples come from the policy, so the mean log-ratio estimates KL(policy || reference).
        kl_terms.append(completion_logps(model, mask, policy_seqs, eos) - reference_logps_of_policy)
        width = mask.shape[1]
        policy_texts = tokenizer.batch_decode(policy_seqs[:, width:], skip_special_tokens=True)
        reference_texts = tokenizer.batch_decode(reference_seqs[:, width:], skip_special_tokens=True)
        for i, prompt in enumerate(chunk):
            row = {
                "prompt": prompt,
                "prompt_text": shown_texts[start + i],
                "policy": policy_texts[i * n : (i + 1) * n],
                "reference": reference_texts[i * n : (i + 1) * n],
            }
            if reward_fn is not None:
                row["policy_rewards"] = [float(reward_fn(text)) for text in row["policy"]]
                row["reference_rewards"] = [float(reward_fn(text)) for text in row["reference"]]
                pairs = [(p > r) + 0.5 * (p == r) for p in row["policy_rewards"] for r in row["reference_rewards"]]
                wins.append(sum(pairs) / len(pairs))
            rows.append(row)
    summary = {"prompts": len(rows), "samples_per_prompt": n, "kl_estimate": torch.cat(kl_terms).mean().item()}
    if reward_fn is not None:
        summary["policy_mean_reward"] = sum(sum(r["policy_rewards"]) for r in rows) / (n * len(rows))
        summary["reference_mean_reward"] = sum(sum(r["reference_rewards"]) for r in rows) / (n * len(rows))
        summary["policy_win_rate"] = sum(wins) / len(wins)
    result = {"summary": summary, "samples": rows}
    target = Path(out) if out else Path(source) / "generations.json"
    if target.parent.is_dir():
        target.write_text(json.dumps(result, indent=2))
    return result


def side_by_side(result: dict, prompts: int = 3, width: int = 100) -> str:
    """The first samples of the first `prompts` prompts as two columns, reference | policy, with
    their rewards, in `width` columns: what a person reads to see what training changed."""
    import textwrap

    column = (width - 3) // 2
    blocks = []
    for row in result["samples"][:prompts]:
        prompt = " ".join(row.get("prompt_text", row["prompt"]).split())
        lines = textwrap.wrap(f"prompt: {prompt}", width) or ["prompt:"]
        heads = []
        for side in ("reference", "policy"):
            rewards = row.get(f"{side}_rewards")
            heads.append(f"{side}" + (f" (reward {rewards[0]:.3f})" if rewards else ""))
        left = textwrap.wrap(" ".join(row["reference"][0].split()), column) or ["(empty)"]
        right = textwrap.wrap(" ".join(row["policy"][0].split()), column) or ["(empty)"]
        lines.append(f"{heads[0]:<{column}} | {heads[1]}")
        lines.append(f"{'-' * column}-+-{'-' * column}")
        for i in range(max(len(left), len(right))):
            lines.append(
                f"{left[i] if i < len(left) else '':<{column}} | {right[i] if i < len(right) else ''}".rstrip()
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def run(args) -> int:
    result = generate_run(
        checkpoint_of(args.run, args.checkpoint) if args.checkpoint else args.run,
        args.prompts,
        n=args.n,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        reward=args.reward,
        seed=args.seed,
        out=args.out,
        batch_size=args.batch_size,
    )
    print(side_by_side(result, prompts=args.show) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0
