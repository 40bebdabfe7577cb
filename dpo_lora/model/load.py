"""Loading the (quantized) base, attaching the LoRA adapter, and the reference context.

The reference model is the same network with the adapter disabled, so one copy of the base is
ever in memory. When training continues from an existing adapter (`lora.init_adapter`), the
reference is that adapter's initial state, held as a second, frozen adapter on the same base.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch

from dpo_lora.core.errors import UserError
from dpo_lora.model import grad_checkpointing, offload
from dpo_lora.model.precision import (
    bf16_is_native,
    cpu_has_native_bf16,
    float32_residual,
    quantization_config,
    resolved,
    torch_dtype,
    weights_dtype,
)
from dpo_lora.model.zero3_loading import load_partitioned, peft_gathers

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


def peft_saved_name(name: str, adapter: str = POLICY_ADAPTER) -> str:
    """An adapter parameter's name as PEFT's adapter files store it: without the adapter's name, and
    DoRA's magnitude without its `.weight` (`q_proj.lora_magnitude_vector`)."""
    magnitude = f".lora_magnitude_vector.{adapter}.weight"
    return name.replace(magnitude, ".lora_magnitude_vector").replace(f".{adapter}.", ".")


def _check_model_path(path: str) -> None:
    local = Path(path)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/")) and not local.exists()
    if not looks_like_hub_id and not (local / "config.json").is_file():
        raise UserError(
            f"config key 'model.path': no model at {path} (expected a Hugging Face model folder with "
            "config.json; `dpo-lora fetch-default-model DIR` makes one for the default model)"
        )


@contextlib.contextmanager
def _hub_errors(path: str):
    """Turn transformers' long download/lookup errors into one line naming the path."""
    try:
        yield
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"config key 'model.path': cannot load {path}: {first_line}") from None


@contextlib.contextmanager
def _kernel_errors(kernel: str | None):
    """An attention kernel the model or this machine cannot run: one line naming the key."""
    try:
        yield
    except (ValueError, ImportError) as err:
        if kernel is None or (kernel not in str(err) and "attention" not in str(err).lower()):
            raise
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"config key 'model.attn_implementation': {kernel!r} cannot run here: {first_line}") from None


def load_tokenizer(model_config):
    from transformers import AutoTokenizer

    _check_model_path(model_config.path)
    with _hub_errors(model_config.path):
        tokenizer = AutoTokenizer.from_pretrained(model_config.path, trust_remote_code=model_config.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {model_config.path} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
    return tokenizer


def load_base(model_config, device: torch.device, ds_config: dict | None = None):
    """The frozen base model on `device`, quantized as configured. Under ZeRO-3 (`ds_config`'s
    stage 3) it is loaded a tensor at a time straight into this rank's partitions."""
    from transformers import AutoModelForCausalLM

    model_config = resolved(model_config, bf16_is_native(device.type))
    _check_model_path(model_config.path)
    kernel = None if model_config.attn_implementation == "auto" else model_config.attn_implementation
    model = None
    zero_stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    with _hub_errors(model_config.path), _kernel_errors(kernel):
        if zero_stage == 3:
            model = load_partitioned(model_config, device, ds_config)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_config.path,
                dtype=weights_dtype(model_config),
                quantization_config=quantization_config(model_config),
                device_map={"": device},
                attn_implementation=kernel,  # None: transformers picks sdpa where supported, else eager
                trust_remote_code=model_config.trust_remote_code,
            )
    model.requires_grad_(False)
    model.config.use_cache = False
    if device.type == "cpu" and model_config.dtype == "bfloat16" and not cpu_has_native_bf16():
        print(
            "dpo-lora: warning: this CPU has no native bfloat16 (AVX512-BF16/AMX); 4-bit training in "
            "bfloat16 runs ~30x slower here than model.dtype=float32",
            file=sys.stderr,
        )
    _keep_4bit_layout_trainable(model)
    _head_reads_contiguous(model)
    if float32_residual(model_config):
        _matmuls_in_bfloat16(model, device)
    if model_config.gradient_checkpointing:
        grad_checkpointing.enable(model, model_config, zero_stage)
    if model_config.offload_activations:
        offload.install(model)
    return model


def _head_reads_contiguous(model) -> None:
    """Hand the LM head a contiguous copy of the positions it scores.

    transformers gives the head `hidden_states[:, -k:]` (`logits_to_keep`: one position in
    generate's prefill, the generated ones when `dpo-lora generate` scores samples), a view that is
    not contiguous. torch's matmul cannot fold such a view into one matrix without a copy, so it
    broadcasts the [vocab, hidden] weight to every row and runs a batched matmul; in bf16 on a CPU
    that copies batch x vocab x hidden (3.6 GB for SmolLM2 at batch 64) and took 12.8 s where the
    copied input's one matmul took 0.45 s (16 x 33 positions, AMX). The copy made here is
    batch x k x hidden."""
    model.get_output_embeddings().register_forward_pre_hook(lambda _head, args: (args[0].contiguous(), *args[1:]))


AUTOCAST_DEVICE = "_dpo_lora_autocast_device"  # set on a base whose forward runs under bf16 autocast


def _matmuls_in_bfloat16(model, device: torch.device) -> None:
    """Every forward of `model` under bf16 autocast, except the LM head: it keeps float32 logits
    (its weight and the final hidden state are float32 here), and the LoRA adapters, which
    `lora_in_float32` takes out of autocast once attached. Gradient checkpointing's recompute
    restores the autocast state of the forward."""
    setattr(model, AUTOCAST_DEVICE, device.type)
    forward, head = model.forward, model.get_output_embeddings()
    head_forward = head.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    def float32_head(hidden_states):
        with torch.autocast(device.type, enabled=False):
            return head_forward(hidden_states.float())

    model.forward, head.forward = autocast_forward, float32_head


def lora_in_float32(model) -> None:
    """Run every LoRA matmul of `model` (a PeftModel) in float32 when its base runs under autocast.

    Autocast would round the float32 adapter to bf16 in each matmul: a LoRA A matrix is ~0.04 in
    size, where one bf16 step is ~1.2e-4, so an Adam update of lr 3e-4 moves it by 2-3 of those
    steps and rounding changes each update by up to a fifth. The adapter's matmuls are r/out_features
    (~0.4% for r=16 at 4096) of a layer's FLOPs; in float32 its updates count in full, as they do
    without autocast (PEFT casts the input to the adapter's dtype). Idempotent: call after every
    adapter load."""
    device_type = getattr(model, AUTOCAST_DEVICE, None)
    if device_type is None:
        return
    for name, module in model.named_modules():
        if name.split(".")[-2:-1] in (["lora_A"], ["lora_B"]) and not getattr(module, "_float32_forward", False):
            module.forward, module._float32_forward = _outside_autocast(module, device_type), True


def _outside_autocast(module, device_type: str):
    forward = module.forward

    def float32_forward(x):
        with torch.autocast(device_type, enabled=False):
            return forward(x.to(module.weight.dtype))

    return float32_forward


def _keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.48 repacks a Linear4bit's weight the first time
    it runs in eval mode without grad, and from then on uses a kernel that has no autograd: after
    one evaluation, gradients would silently stop flowing through every quantized layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_adapter(base, lora_config):
    """Wrap `base` in a PEFT model whose only trainable parameters are the LoRA adapter.

    Adapters are held in float32 whatever the base's dtype (PEFT casts each LoRA input to the
    adapter's dtype and its output back), so updates and gradient sums never round to bf16.
    """
    model = _with_adapter(base, lora_config)
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()
    lora_in_float32(model)
    return model


def attach_trained(model, adapter_dir: Path, name: str, model_config):
    """Load a trained PEFT adapter onto `model` (a base, or a PeftModel with other adapters) as
    `name`, its parameters in the dtype it trained in; returns the PeftModel. Under float32_residual
    the adapter stays float32 and computes in float32, as it trained."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    dtype = torch.float32 if float32_residual(model_config) else torch_dtype(model_config.dtype)
    for param_name, p in model.named_parameters():
        if "lora_" in param_name and f".{name}." in param_name and p.dtype != dtype:
            p.data = p.data.to(dtype)
    lora_in_float32(model)
    return model


def _with_adapter(base, lora_config):
    with peft_gathers(base):  # DoRA's first magnitudes read each (partitioned) base weight
        return _wrapped(base, lora_config)


def _wrapped(base, lora_config):
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora_config.init_adapter:
        if not (Path(lora_config.init_adapter) / "adapter_config.json").is_file():
            raise UserError(f"config key 'lora.init_adapter': no PEFT adapter at {lora_config.init_adapter}")
        _report_adapter_settings(lora_config)
        model = PeftModel.from_pretrained(
            base, lora_config.init_adapter, adapter_name=POLICY_ADAPTER, is_trainable=True
        )
        model.load_adapter(lora_config.init_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter(POLICY_ADAPTER)
        return model
    peft_config = LoraConfig(
        r=lora_config.r,
        lora_alpha=lora_config.alpha,
        lora_dropout=lora_config.dropout,
        target_modules=lora_config.target_modules,
        use_rslora=lora_config.rslora,
        use_dora=lora_config.dora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, peft_config)


def _report_adapter_settings(lora_config) -> None:
    """A continued adapter keeps its own shape: say so where the config asks for another."""
    import json

    saved = json.loads((Path(lora_config.init_adapter) / "adapter_config.json").read_text())
    pairs = (
        ("r", "r"),
        ("alpha", "lora_alpha"),
        ("dropout", "lora_dropout"),
        ("rslora", "use_rslora"),
        ("dora", "use_dora"),
    )
    differing = [
        f"lora.{key}={getattr(lora_config, key)} -> {saved.get(name)}"
        for key, name in pairs
        if saved.get(name) is not None and saved.get(name) != getattr(lora_config, key)
    ]
    wanted = lora_config.target_modules
    if isinstance(wanted, list) and sorted(wanted) != sorted(saved.get("target_modules") or []):
        differing.append(f"lora.target_modules={wanted} -> {sorted(saved.get('target_modules') or [])}")
    if differing:
        print(f"dpo-lora: lora.init_adapter keeps its own settings: {', '.join(differing)}", file=sys.stderr)


@contextlib.contextmanager
def reference_mode(model):
    """Run `model` (a PeftModel) as the reference: adapter disabled, or the frozen initial adapter.
    Always without dropout: the reference is a fixed function (as a precomputed one is)."""
    was_training = model.training
    model.eval()
    try:
        if REFERENCE_ADAPTER not in model.peft_config:
            with model.disable_adapter():
                yield
            return
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            model.set_adapter(POLICY_ADAPTER)
            # set_adapter toggles requires_grad; restore exactly what the optimizer was built on.
            for name, p in model.named_parameters():
                p.requires_grad_(trainable[name])
    finally:
        model.train(was_training)
