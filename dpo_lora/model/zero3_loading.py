"""Loading the quantized base under ZeRO-3 one tensor at a time, so that no rank ever holds it whole.

transformers runs `from_pretrained` under `deepspeed.zero.Init` only for unquantized models: with
a quantization config it builds the model on the meta device and loads every weight onto every
rank, which `deepspeed.initialize` partitions only afterwards. A 70B base in NF4 (about 36 GB)
could then not be loaded on a 24 GB card however many ranks share it.

Here the model is built empty with transformers' own bitsandbytes module swap, then each
checkpoint tensor is read, cast and quantized as `from_pretrained` does it (same dtype, same
device, same bitsandbytes call), and handed straight to ZeRO-3, which broadcasts it from rank 0
and keeps this rank's partition. A rank's peak is its partitions plus the largest single tensor.
Every rank quantizes every tensor itself (deterministic) because the quantization statistics are
attributes, not parameters, and ZeRO-3 does not move them. The largest of them, a 4-bit weight's
blockwise absmax (1/32 of its packed bytes, 1 GiB of a 70B base), is then made a frozen parameter
beside the weight (`<name>_absmax`) that its quantization state points at, so ZeRO-3 partitions it
and gathers it with the weight; the rest (the nested absmax, the codebooks, int8 row scales) stays
whole on every rank.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_lora.core.cpu_memory import release_free_heap
from dpo_lora.core.errors import UserError
from dpo_lora.model.precision import quantization_config, weights_dtype
from dpo_lora.model.requantize import quantized_like
from dpo_lora.model.weight_files import tensor_files

ABSMAX_SUFFIX = "_absmax"


@dataclass(frozen=True)
class HeldBytes:
    """What one rank holds of the base after loading, in bytes."""

    partition: int  # this rank's share of every parameter
    whole: int  # every parameter, unpartitioned
    quant_stats: int  # quantization statistics that are not parameters: whole on every rank
    quantized: int  # of `partition` and `quant_stats`: the quantized weights' (their data and statistics)


def load_partitioned(model_config, device: torch.device, ds_config: dict):
    """The base with every parameter already partitioned by ZeRO-3 over the world, or None (with
    the reason printed) where the checkpoint's tensor names are not the model's own (architectures
    whose weights transformers renames or fuses on load): the caller then loads it whole."""

    files = _checkpoint_files(model_config.path)
    location = _tensor_locations(files)
    dtype = weights_dtype(model_config)
    model, quantizer = _empty_model(model_config, dtype, device)
    holders = _parameter_holders(model)
    missing = [names[0][2] for names in holders.values() if not any(name in location for _, _, name in names)]
    if missing:
        print(
            f"dpo-lora: ZeRO-3: {missing[0]} is not in the checkpoint under that name; loading the base "
            "whole on each rank before partitioning it",
            file=sys.stderr,
        )
        return None
    keep_float32 = [re.compile(pattern.replace("*", ".*")) for pattern in _dtype_plan(model, dtype)]
    partitioner = _Partitioner(ds_config)
    for names in holders.values():
        full_name = next(name for _, _, name in names if name in location)
        module, local_name, _ = names[0]
        old = module._parameters[local_name]
        value = _read(location[full_name], full_name).to(device)
        if quantizer is not None and quantizer.param_needs_quantization(model, full_name):
            new = quantized_like(old, value.to(dtype), device)
        else:
            float32 = any(pattern.search(full_name) for pattern in keep_float32)
            new = torch.nn.Parameter(value.to(torch.float32 if float32 else old.dtype), requires_grad=False)
        for holder, name, _ in names:
            holder._parameters[name] = new
        partitioner.partition(new)
        _partition_absmax(module, local_name, new, partitioner)
        del old, value, new
        release_free_heap()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.eval()
    if torch.distributed.get_rank() == 0:
        held = held_bytes(model)
        print(
            f"dpo-lora: ZeRO-3: base loaded a tensor at a time; rank 0 holds {_size(held.partition)} of its "
            f"{_size(held.whole)} of parameters, +{_size(held.quant_stats)} of quantization statistics whole on "
            f"every rank (quantized layers {_size(held.quantized)}, the rest "
            f"{_size(held.partition + held.quant_stats - held.quantized)}; each rank the same, give or take padding)",
            file=sys.stderr,
        )
    return model


@contextmanager
def peft_gathers(model):
    """While it lasts, PEFT gathers the partitioned weights it reads as it wraps a layer (DoRA's first
    magnitudes are the row norms of each base weight). PEFT gathers only where transformers says
    ZeRO-3 is on, and `load_partitioned` partitions without transformers: say it for this span."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    said = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})  # noqa: F841 (a weak reference holds it)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def gather_in_forward(layer, owners) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward and backward; `layer` also reads
    those of `owners` outside their modules' forward (DoRA's weight norm, the fused LoRA function):
    it gathers them for its own."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for owner in owners:
        for param in owner.parameters(recurse=False):
            register_external_parameter(layer, param)


def gather_dora_base_weights(model) -> int:
    """Under ZeRO-3: each DoRA layer takes the norm of its whole base weight in its own forward,
    after the base layer's forward has ended (and ZeRO-3 has released the weight): it gathers it for
    its forward. The count of such layers."""
    layers = [m for m in model.modules() if getattr(m, "lora_magnitude_vector", None)]
    for layer in layers:
        gather_in_forward(layer, [layer.get_base_layer()])
        _keep_base_weight(layer)
    return len(layers)


def _keep_base_weight(layer) -> None:
    """On the CPU, PEFT's DoRA re-assigns the base weight it has just read (`module.weight =
    module.weight.to(device)`, a new bitsandbytes parameter over the same storage); ZeRO-3 would
    then see a whole weight it does not know. Put its own parameter back after each forward."""
    base = layer.get_base_layer()
    weight = base.weight

    def restore(_module, _args, _output) -> None:
        if base._parameters["weight"] is not weight:
            base._parameters["weight"] = weight

    layer.register_forward_hook(restore)


def held_bytes(model) -> HeldBytes:
    """This rank's share of the base's parameters (ZeRO-3 partitions) and its quantization stats."""
    import bitsandbytes as bnb

    partition = whole = stats = quantized = 0
    for name, param in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        size = param.element_size()
        shard = getattr(param, "ds_tensor", None)
        held = shard.numel() * size if shard is not None else param.numel() * size
        partition += held
        whole += getattr(param, "ds_numel", param.numel()) * size
        stats += _stat_bytes(param)
        if isinstance(param, bnb.nn.Params4bit | bnb.nn.Int8Params) or name.endswith(ABSMAX_SUFFIX):
            quantized += held + _stat_bytes(param)
    return HeldBytes(partition=partition, whole=whole, quant_stats=stats, quantized=quantized)


def _partition_absmax(module, name: str, param, partitioner: _Partitioner) -> None:
    """A 4-bit weight's blockwise absmax as a frozen parameter `<name>_absmax` of its module, which
    its quantization state holds: ZeRO-3 partitions it and gathers it whenever it gathers the weight."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return
    absmax = torch.nn.Parameter(state.absmax, requires_grad=False)
    module.register_parameter(name + ABSMAX_SUFFIX, absmax)
    state.absmax = absmax
    partitioner.partition(absmax)


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _checkpoint_files(path: str) -> list[Path]:

    folder = Path(path)
    if not folder.is_dir():  # a hub id: the files transformers would download, from the cache
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as err:  # noqa: BLE001 - any hub failure is one line naming the path
            raise UserError(f"config key 'model.path': cannot load {path}: {str(err).splitlines()[0]}") from None
    return tensor_files(folder)


def _tensor_locations(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    location = {}
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            location.update(dict.fromkeys(shard.keys(), file))
    return location


def _read(file: Path, name: str) -> torch.Tensor:
    """One tensor, copied out of the file; the mapping is closed again at once, so the pages read
    do not stay in this process's resident memory."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as shard:
        return shard.get_tensor(name)


def _empty_model(model_config, dtype: torch.dtype, device: torch.device):
    """(model with parameters on the meta device and real buffers, transformers' quantizer or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(model_config.path, trust_remote_code=model_config.trust_remote_code)
    config.name_or_path = model_config.path  # the adapter's base_model_name_or_path, as from_pretrained sets it
    kernel = None if model_config.attn_implementation == "auto" else model_config.attn_implementation
    # Building on meta draws no random numbers worth keeping; fork so the LoRA init after it is
    # the same as after `from_pretrained`.
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=kernel, trust_remote_code=model_config.trust_remote_code
        )
    quantizer = None
    bnb_config = quantization_config(model_config)
    if bnb_config is not None:
        quantizer = AutoHfQuantizer.from_config(bnb_config)
        quantizer.preprocess_model(
            model=model, dtype=dtype, device_map={"": device}, checkpoint_files=None, use_kernels=False
        )
    model.tie_weights()
    return model, quantizer


def _parameter_holders(model) -> dict[int, list[tuple[torch.nn.Module, str, str]]]:
    """Each parameter (tied ones once) -> every (module, attribute, full name) that holds it."""
    holders = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            holders[id(param)].append((module, name, f"{module_name}.{name}".lstrip(".")))
    return holders


def _dtype_plan(model, dtype: torch.dtype) -> dict:
    """Name patterns transformers keeps in float32 for this dtype (`_keep_in_fp32_modules`)."""
    plan = getattr(model, "_get_dtype_plan", None)
    return plan(dtype) if plan is not None else {}


def _stat_bytes(param) -> int:
    """Bytes of `param`'s quantization statistics that are not parameters themselves."""
    state = getattr(param, "quant_state", None)
    tensors = [getattr(param, "SCB", None)]
    if state is not None:
        tensors += [state.code] + ([] if isinstance(state.absmax, torch.nn.Parameter) else [state.absmax])
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Partitioner:
    """Hands parameters to ZeRO-3 one at a time, with the settings `deepspeed.initialize` uses."""

    def __init__(self, ds_config: dict) -> None:
        self.ds_config = ds_config
        self.first = None

    def partition(self, param) -> None:
        import deepspeed

        if self.first is not None:
            self.first.convert_to_zero_parameters(param_list=[param])
            return
        offload = self.ds_config.get("zero_optimization", {}).get("offload_param") or {}
        remote = offload.get("device", "none")
        holder = torch.nn.Module()
        holder.register_parameter("param", param)
        deepspeed.zero.Init(
            module=holder,
            config_dict_or_path=self.ds_config,
            remote_device=None if remote == "none" else remote,
            pin_memory=offload.get("pin_memory", False),
        )
        self.first = param
