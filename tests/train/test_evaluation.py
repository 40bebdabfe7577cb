"""Held-out evaluation: the first eval's shortcut (the policy is the reference) gives what the full
policy forward gives, for a fresh adapter and for an init adapter; and it does not hide a policy
that has moved."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lora.data.layout import batch_layout
from dpo_lora.data.prepare import prepare_splits
from dpo_lora.model.load import attach_adapter, load_base, load_tokenizer
from dpo_lora.train.evaluation import EvalShard, evaluate
from dpo_lora.train.reference import CHOSEN, REJECTED, compute_reference_logps

from .test_loop import tiny_config

CPU = torch.device("cpu")


def _lora_b(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if "lora_B" in name and p.requires_grad]


def _model_and_eval_set(config):
    torch.manual_seed(0)
    model = attach_adapter(load_base(config.model, CPU), config.lora)
    tokenizer = load_tokenizer(config.model)
    _, eval_set = prepare_splits(config.data, tokenizer, config.train.seed)
    collate, _ = batch_layout(config, model, tokenizer.pad_token_id)
    return model, eval_set, collate


def _loader(dataset, collate):
    return torch.utils.data.DataLoader(EvalShard(dataset, 0, 1), batch_size=4, collate_fn=collate)


def _with_reference(model, eval_set, collate):
    logps = compute_reference_logps(model, eval_set, collate, 4, 0, 1, CPU)
    return eval_set.add_column(CHOSEN, logps[:, 0].tolist()).add_column(REJECTED, logps[:, 1].tolist())


@pytest.fixture(scope="module")
def init_adapter(tiny_model_dir, tmp_path_factory):
    """A saved adapter whose LoRA B is not zero: a policy that differs from the base."""
    config = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("unused"))
    model = attach_adapter(load_base(config.model, CPU), config.lora)
    torch.manual_seed(1)
    for weight in _lora_b(model):
        weight.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("init-adapter")
    model.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("start", ["fresh", "init_adapter"])
def test_the_first_eval_scores_the_policy_as_the_reference(tiny_model_dir, tmp_path, init_adapter, start):
    overrides = [f"lora.init_adapter={init_adapter}"] if start == "init_adapter" else []
    config = tiny_config(tiny_model_dir, tmp_path / "run", *overrides)
    model, eval_set, collate = _model_and_eval_set(config)
    assert any(w.abs().sum() > 0 for w in _lora_b(model)) == (start == "init_adapter"), "the adapter is as named"

    full = evaluate(model, _loader(eval_set, collate), config.dpo, CPU)
    shortcut = evaluate(model, _loader(_with_reference(model, eval_set, collate), collate), config.dpo, CPU, True)
    assert shortcut.keys() == full.keys()
    for name, value in full.items():
        assert shortcut[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    assert full["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_after_an_update_the_full_eval_sees_the_change(tiny_model_dir, tmp_path):
    """The shortcut holds only while policy and reference agree; the full eval must not hide a move."""
    config = tiny_config(tiny_model_dir, tmp_path / "run")
    model, eval_set, collate = _model_and_eval_set(config)
    scored = _with_reference(model, eval_set, collate)
    for weight in _lora_b(model):
        weight.data.normal_(0, 0.05)
    moved = evaluate(model, _loader(scored, collate), config.dpo, CPU)
    assert abs(moved["eval/loss"] - math.log(2)) > 1e-3
    assert abs(moved["eval/rewards/margins"]) > 1e-3


def test_reference_free_eval_never_takes_the_shortcut(tiny_model_dir, tmp_path):
    """Without a reference (log-probs 0), the policy's own log-probs must be computed."""
    config = tiny_config(tiny_model_dir, tmp_path / "run", "dpo.reference_free=true")
    model, eval_set, collate = _model_and_eval_set(config)
    full = evaluate(model, _loader(eval_set, collate), config.dpo, CPU)
    asked = evaluate(model, _loader(eval_set, collate), config.dpo, CPU, policy_is_reference=True)
    assert asked == full and full["eval/logps/chosen"] < -1.0
