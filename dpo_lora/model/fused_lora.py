"""A 4-bit linear layer with its LoRA adapter as one autograd function (`model.fused_lora`).

PEFT runs a LoRA layer over a bitsandbytes 4-bit base as a chain of modules: the base layer
(cast, dequantize, matmul, cast back), a defensive clone, dropout, A, B, a scale and an add, each
with its own autograd node, about 11 kernels forward and 15 backward. Here one function computes

    y = x W^T + b + s * (dropout(x) A^T) B^T          W = dequantize(NF4 weight), s = alpha / r

forward: bitsandbytes' 4-bit product for the base (one op: a fused dequantize-GEMM, or dequantize
then one GEMM), then the adapter added in place by `addmm` (no clone). backward: dX = dY W (W
dequantized again rather than kept), and only the adapter's gradients:
dA = s (dY B)^T dropout(x), dB = s dY^T (dropout(x) A^T). The base weight gets none.
Dropout runs outside the function, and only when its p is non-zero.

Dtypes follow PEFT's: the base matmul in the quantization's compute dtype, the adapter's first
product in its own dtype (float32); where the layer's output is bf16 (all bf16), the second product
runs in bf16 into the output with float32 accumulation, where PEFT rounds a float32 product and
then the sum. Autocast (the float32-residual policy) does not reach inside.

`model.lora_matmul_dtype: bfloat16` (all bf16 only) runs both adapter products and their backward
in bf16 as well: A and B are rounded to bf16 once per call (r x features each, small), so the
activations are never cast (PEFT casts each input up and each output down, and autograd both
gradients back: four casts of a [tokens, features] tensor per layer and pass), and the input kept
for backward is the bf16 one, half the float32 copy's bytes. The gradients of A and B are bf16
products with float32 accumulation, handed to the float32 weights; the weights and AdamW's states
stay float32.

The adapter-off pass (the reference) runs the same function without the adapter. What it does
not cover falls back to PEFT's layers, named in one line: 8-bit and unquantized bases, DoRA and
other LoRA variants. Mixed-adapter batches (inference) and merged layers take PEFT's path per
call. Under ZeRO-3 each fused layer gathers the weights it reads (DeepSpeed's external parameters).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from dpo_lora.model.precision import float32_residual
from dpo_lora.model.zero3_loading import gather_in_forward

FUSED = "_dpo_lora_fused"
QUANTIZATIONS = ("nf4", "fp4")  # the bases it fuses


class LoRA4bitLinear(torch.autograd.Function):
    """y = x W^T + b, plus s * (xd A^T) B^T when A is given (xd: x after dropout); W dequantized
    from `weight` in `compute` dtype, as bitsandbytes' own layer computes it."""

    @staticmethod
    def forward(ctx, x, xd, weight, quant_state, bias, lora_a, lora_b, scale, compute, lora_dtype=None):
        """`lora_dtype`: the dtype of the adapter's products (None: its weights' own)."""
        import bitsandbytes as bnb

        flat = x.reshape(-1, x.shape[-1])
        bias = None if bias is None else bias.to(compute)
        if quant_state is None:  # a dense weight: the memory plan's meta forward (skeleton_fused)
            y = torch.nn.functional.linear(flat.to(compute), weight.to(compute), bias).to(x.dtype)
        else:
            # bitsandbytes' own 4-bit product, as its layer runs it without grad: one op that picks
            # the device's kernel (a fused dequantize-GEMM, or dequantize then one GEMM)
            y = bnb.matmul_4bit(flat.to(compute), weight.t(), bias=bias, quant_state=quant_state).to(x.dtype)
        if lora_a is not None:
            ctx.master_dtype = lora_a.dtype
            lora_a, lora_b = lora_a.to(lora_dtype or lora_a.dtype), lora_b.to(lora_dtype or lora_b.dtype)
            flat_xd = xd.reshape(-1, xd.shape[-1]).to(lora_a.dtype)
            t = flat_xd @ lora_a.t()  # [N, r], in the adapter's product dtype
            # The base output is ours: the adapter is added in place (no clone), scaled by the GEMM.
            # Where the output is narrower than the adapter (all bf16), t and B are rounded to it and
            # the GEMM accumulates in float32, rounding the sum once.
            y.addmm_(t.to(y.dtype), lora_b.t().to(y.dtype), alpha=scale)
            ctx.save_for_backward(flat_xd, t, lora_a, lora_b)
        ctx.weight, ctx.quant_state, ctx.scale, ctx.compute = weight, quant_state, scale, compute
        ctx.x_meta, ctx.xd_dtype, ctx.has_lora = (x.shape, x.dtype), xd.dtype, lora_a is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as bnb_functional

        x_shape, x_dtype = ctx.x_meta
        dy = grad.reshape(-1, grad.shape[-1])
        dx = dxd = da = db = None
        if ctx.needs_input_grad[0]:
            w = ctx.weight if ctx.quant_state is None else bnb_functional.dequantize_4bit(ctx.weight, ctx.quant_state)
            w = w.to(ctx.compute)  # dequantized again, not kept
            dx = (dy.to(ctx.compute) @ w).to(x_dtype).reshape(x_shape)
        if ctx.has_lora:
            flat_xd, t, lora_a, lora_b = ctx.saved_tensors
            dy_lora = dy.to(lora_a.dtype)
            dt = (dy_lora @ lora_b).mul_(ctx.scale)  # [N, r]
            if ctx.needs_input_grad[5]:
                da = (dt.t() @ flat_xd).to(ctx.master_dtype)
            if ctx.needs_input_grad[6]:
                db = (dy_lora.t() @ t).to(ctx.master_dtype).mul_(ctx.scale)
            if ctx.needs_input_grad[1]:
                dxd = (dt @ lora_a).to(ctx.xd_dtype).reshape(x_shape)
        return dx, dxd, None, None, None, da, db, None, None, None


def fuse(model, model_config, zero_stage: int = 0) -> int:
    """Give every 4-bit LoRA layer of `model` (a PeftModel) the fused forward; the count, or 0
    with one line saying why none could take it."""
    reason = None
    if model_config.quantization not in QUANTIZATIONS:
        reason = f"model.quantization={model_config.quantization} (it fuses 4-bit layers only)"
    layers = [m for m in model.modules() if _is_lora_4bit(m)]
    if reason is None and any(getattr(m, "lora_variant", None) for m in layers):
        reason = "a LoRA variant (DoRA) is on"
    if reason is not None:
        print(f"dpo-lora: model.fused_lora: PEFT's layers instead: {reason}", file=sys.stderr)
        return 0
    lora_dtype = adapter_product_dtype(model_config)
    for module in layers:
        if _give_fused_forward(module, lora_dtype) and zero_stage == 3:
            # It reads the base weight (and its absmax) and the adapter's matrices without calling
            # their modules, whose hooks would gather them.
            gather_in_forward(module, [module.get_base_layer(), *module.lora_A.values(), *module.lora_B.values()])
    return len(layers)


def adapter_product_dtype(model_config, say: bool = True) -> torch.dtype | None:
    """The dtype the fused layers run the adapter's products in: bf16 where `model.lora_matmul_dtype`
    asks for it and the layers' outputs are bf16 (all bf16), else None (the adapter's float32),
    with one line saying why where it was asked for (`say`)."""
    if model_config.lora_matmul_dtype != "bfloat16":
        return None
    if model_config.dtype != "bfloat16" or float32_residual(model_config):
        policy = "the float32 residual" if model_config.dtype == "bfloat16" else f"model.dtype={model_config.dtype}"
        if say:
            print(f"dpo-lora: model.lora_matmul_dtype: float32 instead: {policy} (bfloat16 needs all bf16)", file=sys.stderr)  # fmt: skip
        return None
    return torch.bfloat16


def skeleton_fused(model, model_config) -> None:
    """The memory plan's meta model (PEFT's LoRA over dense meta weights) given the fused forward
    where training would fuse its layers, so that the plan counts what they keep for backward."""
    from peft.tuners.lora import LoraLayer

    if not model_config.fused_lora or model_config.quantization not in QUANTIZATIONS:
        return
    lora_dtype = adapter_product_dtype(model_config, say=False)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            _give_fused_forward(module, lora_dtype)


def _give_fused_forward(layer, lora_dtype) -> bool:
    """Replace `layer`'s forward by the fused one, once; whether it was replaced now."""
    if getattr(layer, FUSED, False):
        return False
    layer.forward = _fused_forward(layer, layer.forward, lora_dtype)
    setattr(layer, FUSED, True)
    return True


def _is_lora_4bit(module) -> bool:
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit)


def _fused_forward(layer, peft_forward, lora_dtype):
    base = layer.get_base_layer()

    def forward(x, *args, **kwargs):
        if args or kwargs or layer.merged:  # mixed-adapter batches and merged layers: PEFT's path
            return peft_forward(x, *args, **kwargs)
        active = [name for name in layer.active_adapters if name in layer.lora_A]
        if layer.disable_adapters or not active:
            lora = (None, None, 1.0)
            xd = x
        else:
            if len(active) > 1:
                return peft_forward(x)
            name = active[0]
            dropout = layer.lora_dropout[name]
            xd = dropout(x) if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 else x
            lora = (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
        weight = base.weight
        compute = getattr(base, "compute_dtype", None) or x.dtype
        device = x.device.type  # no autocast on meta (the plan's forward)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            return LoRA4bitLinear.apply(
                x, xd, weight, getattr(weight, "quant_state", None), base.bias, *lora, compute, lora_dtype
            )

    return forward
