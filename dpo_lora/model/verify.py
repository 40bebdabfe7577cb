"""Checking an exported model against the model it claims to equal, by teacher-forced log-probs.

Every model is scored in float32 and streamed one module at a time (dpo_lora/model/layerwise.py), so the
difference measures the export (merge and storage dtype), not the compute precision, and the
check of a 70B export needs memory for one module, not the model. The claimed models are built
independently of the merge: PEFT's own LoRA forward (its scaling, read from adapter_config.json)
on the base weights, or on the weights the quantized run trained on (dpo_lora/model/requantize.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpo_lora.model.layerwise import adapted_weights, batch_token_logps, folder_weights, streamed_model, tied_aliases
from dpo_lora.model.requantize import Requantizer
from dpo_lora.model.weight_files import WeightFolder

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
    """log p(token_t | tokens_<t) for every probe, [T - 1] each, in float32, one probe at a time."""
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


def verify_export(out: Path, base: Path, adapter_dir: Path, run_config, merge_into: str, dtype: str) -> dict:
    """Max per-token log-prob differences of the merged model in `out` against what it claims to
    equal and (when the run was quantized) against the trained model."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    batches = probe_batches(AutoTokenizer.from_pretrained(str(out)))
    quantized = run_config is not None and run_config.model.quantization != "none"
    compare_trained = merge_into == "original" and quantized
    aliases = tied_aliases(out)
    adapter_state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    base_files = WeightFolder(base)
    unquantized = folder_weights(base_files, aliases)
    requantize = Requantizer(base, run_config.model) if quantized else None

    def trained(name: str) -> torch.Tensor:
        tensor = unquantized(name)
        return requantize(name, tensor) if name in requantize else tensor

    passes = 3 if compare_trained else 2
    with tqdm(total=None, desc=f"verify ({passes} models, by module)", unit="module", dynamic_ncols=True) as bar:

        def score(weight_of, adapter: bool) -> list[torch.Tensor]:
            model = streamed_model(out, weight_of, adapter_dir if adapter else None, on_load=bar.update)
            return batch_token_logps(model, batches)

        merged = score(folder_weights(WeightFolder(out), aliases), adapter=False)
        claimed_base = unquantized if merge_into == "original" else trained
        claimed = score(adapted_weights(claimed_base, adapter_state), adapter=True)
        largest, mean = differences(merged, claimed)
        report = {
            "merge_into": merge_into,
            "dtype": dtype,
            "claimed": "unquantized base + adapter" if merge_into == "original" else "quantized base + adapter",
            "tolerance": TOLERANCE[dtype],
            "max_logp_diff_vs_claimed": largest,
            "mean_logp_diff_vs_claimed": mean,
        }
        if compare_trained:
            # What serving at 16 bits costs against the function that was actually trained.
            largest, mean = differences(merged, score(adapted_weights(trained, adapter_state), adapter=True))
            report["max_logp_diff_vs_trained"], report["mean_logp_diff_vs_trained"] = largest, mean
    return report
