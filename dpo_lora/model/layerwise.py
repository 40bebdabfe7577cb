"""Running a model that is never whole in memory: each module's weights are read just before its
forward and dropped right after it.

The model is built empty (parameters on the meta device; buffers such as rotary frequencies are
real, computed from the config), so the architecture's own forward runs unchanged; hooks on every
module that owns parameters fetch them, as float32, from a `weight_of(name)` function (a LoRA
layer fetches its whole subtree: DoRA reads its base weight outside the base layer's forward).
Peak memory is the largest single module's float32 weights (the LM head or embedding) plus
activations, so a 70B model can be scored on a machine that could not load it.

Why not accelerate's disk offload: it would first write a float32 copy of every weight to disk, and
cannot hold the quantize-dequantize step that rebuilds what a quantized run trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dpo_lora.model.load import peft_saved_name

WeightOf = Callable[[str], torch.Tensor]


def streamed_model(config_dir: Path, weight_of: WeightOf, adapter_config_dir: Path | None = None, on_load=None):
    """The model of `config_dir` (wrapped with the LoRA adapter config of `adapter_config_dir` if
    given) in eval mode, whose parameters are fetched by their names in this model via `weight_of`
    around each forward. `on_load()` is called once per module loaded (for progress)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if adapter_config_dir is not None:
            from peft import LoraConfig, get_peft_model

            lora_config = LoraConfig.from_pretrained(str(adapter_config_dir))
            lora_config.base_model_name_or_path = model.name_or_path  # the base is streamed, not renamed
            model = get_peft_model(model, lora_config)
    model.eval()
    for owner, names in _owners(model):
        owner.register_forward_pre_hook(_loader(names, weight_of, on_load))
        owner.register_forward_hook(_unloader(names))
    return model


def _owners(model):
    """(module, {(holder, attribute): full name}) for each module whose forward uses the weights:
    each module's own parameters, except that an adapted layer (PEFT's LoRA wrapper) holds its
    whole subtree, since DoRA reads its base weight outside the base layer's own forward."""
    from peft.tuners.lora import LoraLayer

    inside_adapted: set[str] = set()
    for module_name, module in model.named_modules():
        if any(module_name.startswith(prefix) for prefix in inside_adapted):
            continue
        adapted = isinstance(module, LoraLayer)
        if adapted:
            inside_adapted.add(module_name + ".")
        names = {
            (module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]): f"{module_name}.{name}".lstrip(
                "."
            )
            for name, _ in module.named_parameters(recurse=adapted)
        }
        if names:
            yield module, names


def _loader(names: dict, weight_of: WeightOf, on_load):
    def load(module, args):
        for (holder, name), full_name in names.items():
            holder._parameters[name] = torch.nn.Parameter(weight_of(full_name).float(), requires_grad=False)
        if on_load is not None:
            on_load()

    return load


def _unloader(names: dict):
    def unload(module, args, output):
        for holder, name in names:
            holder._parameters[name] = torch.nn.Parameter(holder._parameters[name].to("meta"), requires_grad=False)

    return unload


def folder_weights(folder, aliases: dict[str, str] | None = None) -> WeightOf:
    """weight_of for a plain model stored in `folder` (a WeightFolder). A tied weight missing from
    the files (lm_head.weight when the head shares the embedding) is read under its twin's name."""

    def weight_of(name: str) -> torch.Tensor:
        if name not in folder and aliases and name in aliases:
            return folder[aliases[name]]
        return folder[name]

    return weight_of


def tied_aliases(config_dir: Path) -> dict[str, str]:
    """{'lm_head.weight': 'model.embed_tokens.weight'} (or the architecture's names) when tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_dir)))
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def adapted_weights(base_weight_of: WeightOf, adapter_state: dict[str, torch.Tensor]) -> WeightOf:
    """weight_of for a PEFT-wrapped model: LoRA matrices from the adapter's state dict, every
    other weight from the base under its unwrapped name."""

    def weight_of(name: str) -> torch.Tensor:
        if ".lora_" in name:
            return adapter_state[peft_saved_name(name)]
        return base_weight_of(name.removeprefix("base_model.model.").replace(".base_layer.", "."))

    return weight_of


@torch.no_grad()
def batch_token_logps(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """log p(token_t | tokens_<t) for every probe ([1, T] each) in one right-padded forward pass
    (one read of the weights); returns [T - 1] per probe, float32."""
    lengths = [ids.shape[1] for ids in batches]
    ids = torch.zeros(len(batches), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, probe in enumerate(batches):
        ids[row, : lengths[row]], mask[row, : lengths[row]] = probe[0], 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return [logps[row, : length - 1] for row, length in enumerate(lengths)]
