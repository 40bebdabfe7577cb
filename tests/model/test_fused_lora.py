"""The fused 4-bit LoRA linear against PEFT's layers: values and gradients, adapter on and off,
with dropout, float32 (exact to rounding) and bf16 under the float32-residual policy."""

from __future__ import annotations

import pytest
import torch

from dpo_lora.core.config import load_config
from dpo_lora.model.fused_lora import fuse
from dpo_lora.model.load import attach_adapter, load_base

from ..conftest import REPO


def random_adapter(config):
    """The config's base with its adapter drawn at random (seed 0; a fresh adapter's B is zero)."""
    model = attach_adapter(load_base(config.model, torch.device("cpu")), config.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return model


def pair(tiny_model_dir, dtype: str, dropout: float = 0.0, float32_residual: bool | str = "auto"):
    """The same NF4 tiny Llama with the same random adapter twice: PEFT's layers, and fused."""
    config = load_config(None, {"model.path": str(tiny_model_dir), "model.quantization": "nf4", "model.dtype": dtype,
                                "lora.r": 4, "lora.dropout": dropout, "model.float32_residual": float32_residual})  # fmt: skip
    models = [random_adapter(config).train() for _ in range(2)]
    assert fuse(models[1], config.model) == 2 * 7, "every linear of both layers"
    return models


def run(model, ids, seed=3):
    """Logits, and the gradient of a scalar of them, for every LoRA parameter."""
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    loss = (logits.float().log_softmax(-1)[..., :5] * torch.linspace(-1, 1, 5)).sum()
    model.zero_grad()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layers_give_peft_values_and_gradients_in_float32(tiny_model_dir, dropout):
    plain, fused = pair(tiny_model_dir, "float32", dropout)
    ids = torch.randint(3, 300, (2, 11))
    want, want_grads = run(plain, ids)
    got, got_grads = run(fused, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 2 * 2 * 7
    for name in want_grads:  # float32 rounding: the sums run in another order
        assert (got_grads[name] - want_grads[name]).abs().max() <= 1e-5 * want_grads[name].abs().max(), name
    with plain.disable_adapter(), fused.disable_adapter():  # the reference pass: adapter off
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("float32_residual", [True, False], ids=["f32res", "allbf16"])
def test_fused_layers_in_bfloat16_stay_within_rounding_of_peft(tiny_model_dir, float32_residual):
    """Both precision policies: the layers' outputs float32 (the adapter added in float32) or bf16
    (the adapter's second product in bf16)."""
    plain, fused = pair(tiny_model_dir, "bfloat16", float32_residual=float32_residual)
    ids = torch.randint(3, 300, (2, 9))
    want, want_grads = run(plain, ids)
    got, got_grads = run(fused, ids)
    assert got.dtype == want.dtype == (torch.float32 if float32_residual else torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for name in want_grads:
        scale = want_grads[name].abs().max()
        assert (got_grads[name] - want_grads[name]).abs().max() <= 0.05 * scale, name


def test_what_it_does_not_fuse_is_named_in_one_line(tiny_model_dir, capsys):
    plain, _ = pair(tiny_model_dir, "float32")
    capsys.readouterr()
    config = load_config(None, {"model.path": str(tiny_model_dir), "model.quantization": "int8"}).model
    assert fuse(plain, config) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "dpo-lora: model.fused_lora: PEFT's layers instead: model.quantization=int8 (it fuses 4-bit layers only)"
    ]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_training_with_fused_layers_follows_peft_step_for_step(tiny_model_dir, tmp_path, capfd, zero):
    """Three steps with dropout and gradient checkpointing (the recompute replays the same masks),
    through the trainer and DeepSpeed: the same losses, rewards and gradient norms, the same adapter.
    Under ZeRO-3 (one rank: every weight still gathered by hooks) the fused layers gather their own."""
    from safetensors.torch import load_file

    from dpo_lora.train.loop import ADAPTER_DIR, train

    from ..train.test_loop import tiny_config, train_rows

    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        overrides = ["train.max_steps=3", "train.micro_batch_size=4", "data.eval=null", "lora.dropout=0.1",
                     "model.gradient_checkpointing=true", f"model.fused_lora={str(fused).lower()}",
                     f"deepspeed={REPO / 'deepspeed_configs' / zero}.json"]  # fmt: skip
        train(tiny_config(tiny_model_dir, out, *overrides))
        said = "dpo-lora: model.fused_lora: 14 4-bit LoRA layers run as one function each" in capfd.readouterr().err
        assert said == fused
        runs[fused] = (train_rows(out), load_file(out / ADAPTER_DIR / "adapter_model.safetensors"))
    (plain_rows, plain_adapter), (fused_rows, fused_adapter) = runs[False], runs[True]
    for row, expected in zip(fused_rows, plain_rows, strict=True):
        for name in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert row[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (name, row["step"])
    assert plain_rows[-1]["loss"] != plain_rows[0]["loss"], "it trained"
    for name, tensor in fused_adapter.items():
        torch.testing.assert_close(tensor, plain_adapter[name], rtol=1e-3, atol=2e-5, msg=name)
