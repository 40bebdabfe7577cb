"""DPO's reward accuracy on held-out pairs, from a `dpo-lora serve` alone: each completion is scored
with `echo` under the fine-tuned model and under its base (the reference, adapter off), and the
implicit reward is their difference, log pi(y|x) - log ref(y|x), summed over the completion.

Prompts and completions are rendered and tokenized by dpo-lora's own data functions, as training
does (the chat template; the completion ends at the template's end of turn). From the repository
root, with the server running:

    python examples/served_reward_accuracy.py ft:SmolLM2-135M-Instruct:dpo-lora:XXXXXXXX
"""

from __future__ import annotations

import argparse
import json
import os

from openai import OpenAI
from transformers import AutoTokenizer

from dpo_lora.data.chat import render_chat
from dpo_lora.data.tokenization import completion_ids


def completion_logp(client: OpenAI, model: str, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) under `model`: the prompt and completion scored by one echo."""
    answer = client.completions.create(model=model, prompt=prompt + completion, max_tokens=0, echo=True, logprobs=0)
    return sum(answer.choices[0].logprobs.token_logprobs[len(prompt) :])


def reward_accuracy(client: OpenAI, model: str, base: str, tokenizer, rows: list[dict]) -> dict:
    """Share of pairs whose chosen completion gets the larger implicit reward, and the mean margin."""
    margins = []
    for row in rows:
        rewards = []
        for side in ("chosen", "rejected"):
            prompt_text, completion_text = render_chat(tokenizer, row["prompt"], row[side])
            prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            completion = completion_ids(tokenizer, completion_text, chat=True)
            rewards.append(completion_logp(client, model, prompt, completion) - completion_logp(client, base, prompt, completion))  # fmt: skip
        margins.append(rewards[0] - rewards[1])
    return {
        "pairs": len(rows),
        "reward_accuracy": sum(m > 0 for m in margins) / len(rows),
        "mean_logratio_margin": sum(margins) / len(rows),  # times dpo.beta: `dpo-lora eval`'s mean_margin
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the fine-tuned model's id")
    parser.add_argument("--base", default="SmolLM2-135M-Instruct", help="its base model's id (the reference)")
    parser.add_argument("--tokenizer", default="models/SmolLM2-135M-Instruct", help="the base's folder")
    parser.add_argument("--data", default="data/sentiment/eval.jsonl", help="conversational pairs (JSONL)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("DPO_LORA_API_KEY", "none"))
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(json.dumps(reward_accuracy(client, args.model, args.base, tokenizer, rows), indent=2))


if __name__ == "__main__":
    main()
