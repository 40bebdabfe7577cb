"""Checking an exported model against the model it claims to equal, by teacher-forced log-probs.

Every model is scored in float32, one at a time (a 7B check never holds two models), so the
difference measures the export (merge and storage dtype), not the compute precision.
"""

from __future__ import annotations

import gc

import torch

# Largest per-token log-prob difference accepted, by the storage dtype of the merged weights.
# Measured on SmolLM2-135M: a float32 merge is within 3e-5 of base + adapter and bf16 storage
# rounding alone moves the worst of ~150 tokens by 0.37; an unmerged or mis-scaled adapter moves
# tokens by whole nats (the NF4 quantization error alone: 10 on the worst token).
TOLERANCE = {"float32": 2e-3, "float16": 0.15, "bfloat16": 0.6}
PROBE_TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "I watched the film last night, and the acting was wonderful.",
    "Water boils at 100 degrees Celsius at sea level.",
]


def probe_batches(tokenizer) -> list[torch.Tensor]:
    """Token ids of the probe texts, plain and (when the tokenizer has one) in the chat template."""
    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        for text in PROBE_TEXTS[:2]:
            messages = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": text}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]


@torch.no_grad()
def token_logps(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """log p(token_t | tokens_<t) for every probe, [T - 1] each, in float32."""
    model.eval()
    out = []
    for ids in batches:
        logits = model(input_ids=ids.to(model.device)).logits[0, :-1].float()
        out.append(torch.log_softmax(logits, -1).gather(1, ids[0, 1:].unsqueeze(1).to(logits.device)).squeeze(1).cpu())
    return out


def differences(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(largest, mean) absolute per-token log-prob difference."""
    gaps = torch.cat([(x - y).abs() for x, y in zip(a, b, strict=True)])
    return gaps.max().item(), gaps.mean().item()


def score_and_free(load, batches) -> list[torch.Tensor]:
    """Build a model with `load()`, score the probes, and release it before the next one."""
    model = load()
    scores = token_logps(model, batches)
    del model
    gc.collect()
    return scores
