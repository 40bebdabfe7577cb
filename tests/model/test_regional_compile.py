"""`model.compile: layers` against the eager layers: log-probs and every adapter gradient of the
trainer's own forward (shared prompt, split attention, gradient checkpointing, NF4 + LoRA), on
two batches of different lengths, adapter on and off."""

from __future__ import annotations

import torch

from dpo_lora.core.config import load_config
from dpo_lora.data.layout import collate_pairs
from dpo_lora.model import shared_attention
from dpo_lora.model.regional_compile import compile_layers
from dpo_lora.train.step import concatenated_logps, forward_inputs

from .test_fused_lora import random_adapter


def policy(tiny_model_dir):
    config = load_config(None, {"model.path": str(tiny_model_dir), "model.quantization": "nf4", "model.dtype": "float32",
                                "model.gradient_checkpointing": True, "lora.r": 4, "lora.dropout": 0.0})  # fmt: skip
    model = random_adapter(config)
    shared_attention.use_on(model)
    return model.train()


def batch(rows: list[tuple[int, int, int]], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    features = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in rows]
    return collate_pairs(features, pad_token_id=0, share_prompt=True)


def logps_and_grads(model, pairs: dict):
    forward_inputs(pairs, model)  # the plan, made before checkpointing as training does
    logps, _ = concatenated_logps(model, pairs)
    model.zero_grad()
    (logps * torch.linspace(-1, 1, logps.shape[0])).sum().backward()
    with torch.no_grad(), model.disable_adapter():
        reference = concatenated_logps(model, pairs)[0]
    return logps.detach(), reference, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_give_the_eager_log_probs_and_gradients(tiny_model_dir):
    model = policy(tiny_model_dir)
    batches = [batch([(5, 4, 6), (3, 7, 2)], seed=1), batch([(9, 3, 5), (4, 4, 4), (2, 6, 3)], seed=2)]
    eager = [logps_and_grads(model, pairs) for pairs in batches]
    assert compile_layers(model) == 2
    for (want, want_reference, want_grads), pairs in zip(eager, batches, strict=True):
        got, got_reference, got_grads = logps_and_grads(model, pairs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_reference, want_reference, rtol=1e-5, atol=1e-5)
        assert got_grads.keys() == want_grads.keys() and len(want_grads) == 2 * 2 * 7
        for name in want_grads:
            assert (got_grads[name] - want_grads[name]).abs().max() <= 1e-5 * want_grads[name].abs().max(), name
    assert all(layer._compiled_call_impl is not None for layer in model.base_model.model.model.layers)


def test_under_zero3_the_layers_stay_eager_with_one_line(tiny_model_dir, capsys):
    model = policy(tiny_model_dir)
    capsys.readouterr()
    assert compile_layers(model, zero_stage=3) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "dpo-lora: model.compile: the layers run eagerly: ZeRO-3 gathers parameters in module hooks inside the layer"
    ]
    assert all(layer._compiled_call_impl is None for layer in model.base_model.model.model.layers)
