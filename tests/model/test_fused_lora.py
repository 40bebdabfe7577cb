"""The fused 4-bit LoRA linear against a float64 oracle and against PEFT's layers: values and
gradients, adapter on and off, with dropout, float32 (exact to rounding), and bf16 under both
precision policies and with the adapter's products in bf16 (`model.lora_matmul_dtype`)."""

from __future__ import annotations

import pytest
import torch

from dpo_lora.core.config import load_config
from dpo_lora.model.fused_lora import LoRA4bitLinear, fuse
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


def pair(tiny_model_dir, dtype: str, dropout: float = 0.0, float32_residual: bool | str = "auto", lora="float32",
         rslora: bool = False):  # fmt: skip
    """The same NF4 tiny Llama with the same random adapter twice: PEFT's layers, and fused."""
    config = load_config(None, {"model.path": str(tiny_model_dir), "model.quantization": "nf4", "model.dtype": dtype,
                                "lora.r": 4, "lora.dropout": dropout, "model.float32_residual": float32_residual,
                                "model.fused_lora": True, "model.lora_matmul_dtype": lora, "lora.rslora": rslora})  # fmt: skip
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


@pytest.mark.parametrize("dropout, rslora", [(0.0, False), (0.3, False), (0.0, True)], ids=["plain", "dropout", "rslora"])  # fmt: skip
def test_fused_layers_give_peft_values_and_gradients_in_float32(tiny_model_dir, dropout, rslora):
    plain, fused = pair(tiny_model_dir, "float32", dropout, rslora=rslora)
    scale = plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert scale == (32 / 4**0.5 if rslora else 32 / 4), "rsLoRA scales alpha / sqrt(r)"
    ids = torch.randint(3, 300, (2, 11))
    want, want_grads = run(plain, ids)
    got, got_grads = run(fused, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 2 * 2 * 7
    for name in want_grads:  # float32 rounding: the sums run in another order
        assert (got_grads[name] - want_grads[name]).abs().max() <= 1e-5 * want_grads[name].abs().max(), name
    with plain.disable_adapter(), fused.disable_adapter():  # the reference pass: adapter off
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("float32_residual", "lora"),
    [(True, "float32"), (False, "float32"), (False, "bfloat16")],
    ids=["f32res", "allbf16", "allbf16-bf16lora"],
)
def test_fused_layers_in_bfloat16_stay_within_rounding_of_peft(tiny_model_dir, float32_residual, lora):
    """Both precision policies: the layers' outputs float32 (the adapter added in float32) or bf16
    (the adapter's second product in bf16, or both products and their gradients)."""
    plain, fused = pair(tiny_model_dir, "bfloat16", float32_residual=float32_residual, lora=lora)
    ids = torch.randint(3, 300, (2, 9))
    want, want_grads = run(plain, ids)
    got, got_grads = run(fused, ids)
    assert got.dtype == want.dtype == (torch.float32 if float32_residual else torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for name in want_grads:
        scale = want_grads[name].abs().max()
        assert (got_grads[name] - want_grads[name]).abs().max() <= 0.05 * scale, name


# The function's own tests run on the GPU where one is present (bench/gpu_check.py runs this file):
# there bitsandbytes' CUDA kernels compute the base product.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantized(dtype=torch.bfloat16, out_features=48, in_features=32):
    """An NF4 weight as bitsandbytes packs it, its quant state, and its dequantized values."""
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, dtype=dtype).to(DEVICE)
    packed, state = bnb_functional.quantize_4bit(weight)
    return packed, state, bnb_functional.dequantize_4bit(packed, state)


def fused_and_oracle(lora_dtype, dtype=torch.bfloat16, scale=2.0):
    """y, dx, dA, dB of `sum(g * y)` from the fused function (A, B float32 masters), and the same
    from float64 arithmetic on the same inputs and dequantized weight."""
    packed, state, w = quantized(dtype)
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32).to(DEVICE, dtype)
    a, b = (torch.randn(4, 32) * 0.3).to(DEVICE), (torch.randn(48, 4) * 0.3).to(DEVICE)
    g = torch.randn(3, 7, 48).to(DEVICE, dtype)
    results = []
    for exact in (False, True):
        leaves = [t.detach().double() if exact else t.detach().clone() for t in (x, a, b)]
        for leaf in leaves:
            leaf.requires_grad_()
        xx, aa, bb = leaves
        if exact:
            y = xx @ w.double().t() + scale * (xx @ aa.t()) @ bb.t()
        else:
            y = LoRA4bitLinear.apply(xx, xx, packed, state, None, aa, bb, scale, dtype, lora_dtype)
        (y.double() * g.double()).sum().backward()
        results.append([y.detach().double(), *(leaf.grad.double() for leaf in leaves)])
    return results


@pytest.mark.parametrize("lora_dtype", [None, torch.bfloat16], ids=["f32-products", "bf16-products"])
def test_fused_function_matches_a_float64_oracle_in_bfloat16(lora_dtype):
    """Values and the gradients of x, A and B, within bf16 rounding of the largest; A and B's
    gradients come back float32, for their float32 weights."""
    (got, *got_grads), (want, *want_grads) = fused_and_oracle(lora_dtype)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    for name, g, w in zip(("x", "A", "B"), got_grads, want_grads, strict=True):
        assert (g - w).abs().max() <= 1e-2 * w.abs().max(), name


def test_fused_function_matches_a_float64_oracle_in_float32():
    (got, *got_grads), (want, *want_grads) = fused_and_oracle(None, dtype=torch.float32)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    for name, g, w in zip(("x", "A", "B"), got_grads, want_grads, strict=True):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max(), name


class ActivationCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dtype casts of tensors with `rows` rows (the [tokens, features] activations)."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.count = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].reshape(-1, args[0].shape[-1]).shape[0] == self.rows:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lora_dtype", [None, torch.bfloat16], ids=["f32-products", "bf16-products"])
def test_bf16_products_cast_no_activation(lora_dtype):
    """With the adapter's products in bf16 nothing of the activations' size is cast, forward or
    backward, and the input kept for backward is the bf16 one; in float32 the input, the first
    product ([tokens, r]), the output's gradient and the input's gradient are each cast once."""
    packed, state, _ = quantized()
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    a = (torch.randn(4, 32, device=DEVICE) * 0.3).requires_grad_()
    b = (torch.randn(48, 4, device=DEVICE) * 0.3).requires_grad_()
    with ActivationCasts(rows=21) as casts:
        y = LoRA4bitLinear.apply(x, x, packed, state, None, a, b, 2.0, torch.bfloat16, lora_dtype)
        kept = y.grad_fn.saved_tensors[0]
        y.backward(torch.ones_like(y))
    assert kept.dtype == (torch.bfloat16 if lora_dtype else torch.float32)
    assert casts.count == (0 if lora_dtype else 4)
    assert a.grad.dtype == b.grad.dtype == torch.float32


def test_bf16_products_need_all_bf16_and_the_fused_layers(tiny_model_dir, capsys):
    """Under the float32 residual the fused layers keep float32 products, in one line; without the
    fused layers the config is refused, naming the key."""
    from dpo_lora.core.errors import UserError

    pair(tiny_model_dir, "bfloat16", float32_residual=True, lora="bfloat16")
    assert "dpo-lora: model.lora_matmul_dtype: float32 instead: the float32 residual (bfloat16 needs all bf16)" in (
        capsys.readouterr().err.splitlines()
    )
    with pytest.raises(UserError, match="'model.lora_matmul_dtype'.*model.fused_lora: true"):
        load_config(None, {"model.path": str(tiny_model_dir), "model.lora_matmul_dtype": "bfloat16"})


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


def test_training_with_bf16_products_follows_float32_products(tiny_model_dir, tmp_path, capfd):
    """All bf16 through the trainer and DeepSpeed (ZeRO-2), three steps: bf16 products give the
    float32 products' losses and gradient norms within bf16 rounding, and train the float32 adapter."""
    from safetensors.torch import load_file

    from dpo_lora.train.loop import ADAPTER_DIR, train

    from ..train.test_loop import tiny_config, train_rows

    runs = {}
    for lora in ("float32", "bfloat16"):
        out = tmp_path / lora
        overrides = ["train.max_steps=3", "train.micro_batch_size=4", "data.eval=null", "model.dtype=bfloat16",
                     "model.float32_residual=false", "model.fused_lora=true", f"model.lora_matmul_dtype={lora}"]  # fmt: skip
        train(tiny_config(tiny_model_dir, out, *overrides))
        assert "lora_matmul_dtype" not in capfd.readouterr().err, "bf16 applies here"
        runs[lora] = (train_rows(out), load_file(out / ADAPTER_DIR / "adapter_model.safetensors"))
    (f32_rows, f32_adapter), (bf16_rows, bf16_adapter) = runs["float32"], runs["bfloat16"]
    for row, expected in zip(bf16_rows, f32_rows, strict=True):
        for name in ("loss", "grad_norm"):
            assert row[name] == pytest.approx(expected[name], rel=3e-2), (name, row["step"])
    assert f32_rows[-1]["loss"] != f32_rows[0]["loss"], "it trained"
    for name, tensor in bf16_adapter.items():
        assert tensor.dtype == torch.float32, name
        if "lora_B" in name:  # B starts at zero: what it holds is what training moved it by
            moved = f32_adapter[name].norm()
            assert moved > 0 and (tensor - f32_adapter[name]).norm() <= 0.1 * moved, name
