"""Requantizing one tensor at a time gives exactly the weights of the whole quantized model."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from dpo_lora.core.schema import ModelConfig
from dpo_lora.model.load import load_base
from dpo_lora.model.requantize import Requantizer


def whole_model_weights(model_config) -> dict[str, torch.Tensor]:
    """The oracle: load the quantized model as training does, and dequantize every layer."""
    import bitsandbytes as bnb

    model = load_base(model_config, torch.device("cpu"))
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = copy.copy(module.weight.quant_state)
            state.dtype = torch.float32
            weights[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[name + ".weight"] = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return weights


@pytest.mark.parametrize(("quantization", "dtype"), [("nf4", "float32"), ("nf4", "bfloat16"), ("fp4", "float32"), ("int8", "float32")])  # fmt: skip
def test_each_tensor_requantized_alone_equals_the_loaded_quantized_model(tiny_model_dir, quantization, dtype):
    model_config = ModelConfig(path=str(tiny_model_dir), quantization=quantization, dtype=dtype)
    expected = whole_model_weights(model_config)
    requantize = Requantizer(tiny_model_dir, model_config)
    stored = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sorted(expected) == sorted(name for name in stored if name in requantize)
    assert "lm_head.weight" not in requantize and "model.embed_tokens.weight" not in requantize
    for name, weight in expected.items():
        got = requantize(name, stored[name])
        assert got.dtype == torch.float32 and torch.equal(got, weight.float()), name
        assert not torch.equal(got, stored[name].float()), f"{name}: quantization must change the weight"
