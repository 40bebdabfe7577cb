"""preference_step: one batch through policy and reference."""

from __future__ import annotations

import math

import torch

from dpo_lora.core.schema import DpoConfig, LoraConfig, ModelConfig
from dpo_lora.data.layout import collate_pairs
from dpo_lora.model.load import attach_adapter, load_base
from dpo_lora.train.step import preference_step


def batch_of(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    features = [{"prompt_ids": ids(4), "chosen_ids": ids(3), "rejected_ids": ids(5)} for _ in range(3)]
    return collate_pairs(features, pad_token_id=0)


def fresh_policy(model_dir):
    torch.manual_seed(0)
    return attach_adapter(
        load_base(ModelConfig(path=str(model_dir), dtype="float32"), torch.device("cpu")), LoraConfig(dropout=0.0)
    )


def test_fresh_adapter_gives_log2_and_zero_rewards(tiny_model_dir):
    model = fresh_policy(tiny_model_dir)
    loss, stats = preference_step(model, batch_of(model.config.vocab_size), DpoConfig(beta=0.1))
    assert loss.item() == math.log(2) or abs(loss.item() - math.log(2)) < 1e-6
    assert all(v.shape == (3,) for v in stats.values())
    assert torch.all(stats["rewards/chosen"] == 0) and torch.all(stats["rewards/accuracies"] == 0)
    assert loss.requires_grad and not stats["loss"].requires_grad


def test_reference_free_runs_one_forward_and_ignores_the_reference(tiny_model_dir):
    model = fresh_policy(tiny_model_dir)
    calls = []
    model.base_model.model.register_forward_hook(lambda *_: calls.append(1))
    batch = batch_of(model.config.vocab_size)
    _, stats = preference_step(model, batch, DpoConfig(beta=0.1, reference_free=True))
    assert len(calls) == 1
    torch.testing.assert_close(stats["rewards/chosen"], 0.1 * stats["logps/chosen"])
    calls.clear()
    preference_step(model, batch, DpoConfig(beta=0.1))
    assert len(calls) == 2
