"""The weights a quantized run actually trained on, rebuilt one tensor at a time.

Loading the whole 4-bit model to dequantize it would hold the full model (and, dequantized, a
float32 copy of it); a 7B export then needs ~30 GB. Instead, each base tensor read from the
checkpoint goes through the same steps transformers and bitsandbytes apply at load time (cast
to the run's dtype, `Params4bit` / `Int8Params` quantization with the layer's settings) and is
dequantized at once, so only one tensor is ever quantized at a time. Which layers are quantized
comes from transformers' own rules, applied to an empty (meta) copy of the model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dpo_lora.model.precision import quantization_config, weights_dtype


class Requantizer:
    """weight name -> the dequantized float32 weight the quantized run used, for quantized layers."""

    def __init__(self, base: Path, model_config) -> None:

        self.load_dtype = weights_dtype(model_config)  # what training cast each tensor to before quantizing
        self.layers = quantized_layers(base, quantization_config(model_config))

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` [out, in] as stored in the checkpoint -> dequant(quant(tensor)) [out, in] float32."""
        import bitsandbytes as bnb

        value = tensor.to(self.load_dtype)
        # Not linked to the empty layer: it would keep every quantization state for the export's life.
        quantized = quantized_like(self.layers[name].weight, value, value.device, link_module=False)
        if isinstance(quantized, bnb.nn.Params4bit):
            # Dequantized in float32 rather than the compute dtype, so the merge adds no rounding of
            # its own before the export dtype.
            state = copy.copy(quantized.quant_state)
            state.dtype = torch.float32
            return bnb.functional.dequantize_4bit(quantized.data, state)
        return bnb.functional.int8_vectorwise_dequant(quantized.data, quantized.SCB)


def quantized_like(empty, value: torch.Tensor, device: torch.device, link_module: bool = True):
    """The bitsandbytes parameter transformers' loader makes of checkpoint tensor `value` (already
    in the load dtype) for the empty quantized parameter `empty`: built from its settings and
    quantized by moving it to `device`. `link_module`: the new parameter knows the empty one's layer."""
    import bitsandbytes as bnb

    settings = {k: v for k, v in empty.__dict__.items() if k != "SCB" and (link_module or k != "module")}
    if isinstance(empty, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(value, requires_grad=False, **settings).to(device)
    return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **settings).to(device)


def quantized_layers(base: Path, quantization) -> dict[str, torch.nn.Module]:
    """Weight name -> the empty bitsandbytes layer transformers puts there when it loads `base`."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    config = AutoConfig.from_pretrained(str(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = HfQuantizer.get_modules_to_not_convert(
        model, quantization.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantization)
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, kinds)}
