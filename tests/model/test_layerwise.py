"""A model streamed one module at a time scores like the whole model, with and without LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dpo_lora.model.layerwise import adapted_weights, batch_token_logps, folder_weights, streamed_model, tied_aliases
from dpo_lora.model.verify import differences, token_logps
from dpo_lora.model.weight_files import WeightFolder

VOCAB = 96


def tiny(architecture: str):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    return {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2-tied": lambda: Qwen2Config(**common, tie_word_embeddings=True),
        "gemma2-tied": lambda: Gemma2Config(**common, head_dim=8, tie_word_embeddings=True),
    }[architecture]()


@pytest.fixture(params=["llama", "qwen2-tied", "gemma2-tied"])
def model_dir(request, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny(request.param), dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def probes() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (1, length), generator=generator) for length in (5, 17, 11)]


def test_streamed_model_scores_like_the_whole_model_holding_one_module_at_a_time(model_dir):
    from transformers import AutoModelForCausalLM

    whole = token_logps(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), probes())
    largest_held, loads = [], []

    def held() -> None:  # called after each module's weights arrive
        loads.append(1)
        largest_held.append(sum(p.numel() for p in model.parameters() if not p.is_meta))

    model = streamed_model(model_dir, folder_weights(WeightFolder(model_dir), tied_aliases(model_dir)), on_load=held)
    streamed = batch_token_logps(model, probes())
    assert differences(whole, streamed)[0] < 1e-5
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert max(largest_held) == largest_module, "never more than one module's weights in memory"
    assert all(p.is_meta for p in model.parameters()), "weights are dropped after the forward"
    assert len(loads) >= 2 * len(list(model.model.layers)), "every layer's modules are loaded in turn"


@pytest.mark.parametrize("dora", [False, True])
def test_streamed_model_with_adapter_scores_like_peft(model_dir, tmp_path, dora):
    """DoRA reads its base weight outside the base layer's forward: the adapted layer holds its subtree."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", use_dora=dora)
    peft_model = get_peft_model(base, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained adapter; PEFT starts B at zero
        if "lora_magnitude_vector" in name:
            param.data.mul_(torch.rand_like(param) + 0.5)  # and DoRA at the base's row norms
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = token_logps(peft_model, probes())
    base_weights = folder_weights(WeightFolder(model_dir), tied_aliases(model_dir))
    adapter_state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    model = streamed_model(model_dir, adapted_weights(base_weights, adapter_state), tmp_path / "adapter")
    assert differences(expected, batch_token_logps(model, probes()))[0] < 1e-5
    unadapted = streamed_model(model_dir, base_weights)
    assert differences(expected, batch_token_logps(unadapted, probes()))[0] > 1e-2, "the adapter must matter"
