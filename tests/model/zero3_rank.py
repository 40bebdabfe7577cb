"""`python -m tests.model.zero3_rank MODEL_DIR:QUANTIZATION:DTYPE ...` (one rank, or several through the
deepspeed launcher): for each case, loads the base partitioned under ZeRO-3 and, on every rank,
whole as `from_pretrained` does; prints one JSON line per rank and case comparing them.

Every gathered parameter and quantization statistic must equal the whole model's bit for bit,
and the logits of both must agree; `held` is this rank's share of the parameters.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    from dpo_lora.core.distributed import init_distributed
    from dpo_lora.core.schema import ModelConfig

    dist = init_distributed()
    for case in sys.argv[1:]:
        if not case.startswith("--local_rank"):
            model_dir, quantization, dtype = case.split(":")
            compare(dist, ModelConfig(path=model_dir, quantization=quantization, dtype=dtype))


def compare(dist, model_config) -> None:
    import deepspeed

    from dpo_lora.model.load import load_base
    from dpo_lora.model.zero3_loading import ABSMAX_SUFFIX, held_bytes

    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    world = dist.world_size
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
                 "zero_optimization": zero}  # fmt: skip
    partitioned = load_base(model_config, dist.device, ds_config)
    held = held_bytes(partitioned)
    whole = load_base(model_config, dist.device)
    whole_params = dict(whole.named_parameters(remove_duplicate=False))
    everything = dict(partitioned.named_parameters(remove_duplicate=False))
    # Beside each 4-bit weight, its absmax as a parameter of its own (what ZeRO-3 partitions).
    names = {name: param for name, param in everything.items() if not name.endswith(ABSMAX_SUFFIX)}
    assert sorted(names) == sorted(whole_params), "different parameter names"
    absmax_params = sorted(name.removesuffix(ABSMAX_SUFFIX) for name in everything if name.endswith(ABSMAX_SUFFIX))
    expected_absmax = sorted(name for name, p in whole_params.items() if getattr(p, "quant_state", None) is not None)
    assert absmax_params == expected_absmax, (absmax_params, expected_absmax)
    mismatched = []
    with deepspeed.zero.GatheredParameters(list(partitioned.parameters())):
        for name, param in names.items():
            expected = whole_params[name]
            same = (
                type(param) is type(expected)
                and param.shape == expected.shape
                and param.dtype == expected.dtype
                and torch.equal(param.data.view(torch.uint8), expected.data.view(torch.uint8))
                and _stats(param) == _stats(expected)
            )
            if not same:
                mismatched.append(name)
        tied = partitioned.get_output_embeddings().weight is partitioned.get_input_embeddings().weight
        ids = torch.randint(0, partitioned.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = partitioned(input_ids=ids.to(dist.device)).logits.float()
            expected_logits = whole(input_ids=ids.to(dist.device)).logits.float()
    row = {
        "case": f"{model_config.path}:{model_config.quantization}:{model_config.dtype}",
        "rank": dist.rank,
        "world_size": world,
        "held": held.partition,
        "whole": held.whole,
        "quant_stats": held.quant_stats,
        "quantized": held.quantized,
        "mismatched": mismatched,
        "tied": tied,
        "expected_tied": whole.get_output_embeddings().weight is whole.get_input_embeddings().weight,
        "max_logit_diff": (logits - expected_logits).abs().max().item(),
    }
    # One write call: the ranks share stdout, and a pipe keeps writes under 4 KiB whole.
    os.write(sys.stdout.fileno(), f"ZERO3_RANK {json.dumps(row)}\n".encode())


def _stats(param) -> list:
    """The quantization statistics as plain lists (absmax, nested absmax, int8 row scales)."""
    state = getattr(param, "quant_state", None)
    found = [getattr(param, "SCB", None)]
    if state is not None:
        found += [state.absmax, state.code, state.shape, state.quant_type]
        if state.nested:
            found += [state.offset, state.state2.absmax, state.state2.code]
    return [value.tolist() if isinstance(value, torch.Tensor) else value for value in found]


if __name__ == "__main__":
    main()
