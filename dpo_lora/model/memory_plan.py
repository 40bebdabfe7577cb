"""`dpo-lora plan`: the per-rank device memory of a run, predicted from its config alone.

Only the model's config.json is read (and, for `data_lengths`, the tokenizer and training data).
Parameter shapes come from an empty (meta) model and the quantized layers from transformers' own
rules (dpo_lora.model.requantize). The activations are counted,
not modelled: the policy forward of a two-layer copy of the model runs on the meta device (shapes,
no memory) under `torch.autograd.graph.saved_tensors_hooks`, and the bytes the second decoder
layer saves for backward are one layer's share. Attention is counted as a fused kernel (flash /
memory-efficient: q, k, v, output, log-sum-exp and the mask), as CUDA and CPU sdpa both save.
Nothing is allocated, so a 70B config plans in seconds on any machine.

Not counted: allocator fragmentation and caching (torch reserves more than it allocates), the
CUDA context and library workspaces (FIXED_OVERHEAD stands for them), the reference forward's
transients (it runs without grad before the policy forward and frees them), and DeepSpeed's
communication buckets beyond the gradient partition.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from dpo_lora.core.dsconfig import read_json
from dpo_lora.data.layout import padded_width, unsupported_reason
from dpo_lora.data.prepare import tokenized_split
from dpo_lora.model.fused_lora import skeleton_fused
from dpo_lora.model.grad_checkpointing import checkpointed_count, keeps_attention_outputs
from dpo_lora.model.load import load_tokenizer
from dpo_lora.model.precision import float32_residual, torch_dtype
from dpo_lora.model.weight_plan import ZeroSettings, optimizer_components, skeleton, weight_components

FIXED_OVERHEAD = 1 << 30  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack: ~0.5-1 GiB measured by others
# Live bytes per logit of a head chunk at its peak (the forward: float32 logits turned into
# softmax - onehot in place, plus, with a 16-bit model, its 16-bit copy for the matmul with the
# weight), counted on CPU by tests/model/test_memory_plan.py: 4.0 with a float32 model, 6.0 with a 16-bit one.
LOGIT_BYTES = {4: 4, 2: 6}


@dataclass
class Plan:
    components: dict[str, int]  # name -> device bytes per rank
    tokens_per_row: int
    rows: int
    host: dict[str, int] = field(default_factory=dict)  # name -> host bytes per rank (what ZeRO offloads)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


@dataclass(frozen=True)
class RowLengths:
    """Token counts that size a micro-batch's rows: the worst case `data.max_length` allows, or
    the longest pair of the training data (`data_lengths`)."""

    shared_row: int  # prompt + chosen + rejected (the shared-prompt layout's row)
    unshared_row: int  # prompt + the longer completion (chosen and rejected as their own rows)
    completion: int  # the longest completion (scored positions per sequence)

    @classmethod
    def worst_case(cls, max_length: int) -> RowLengths:
        # Shared, a row holds the prompt once and both completions: up to 2 x max_length tokens.
        return cls(shared_row=2 * max_length, unshared_row=max_length, completion=max_length - 1)


@dataclass(frozen=True)
class TokenCounts:
    """What a training set's tokenized pairs count (truncated as training does)."""

    longest: RowLengths  # the longest pair: what sizes a micro-batch
    pairs: int
    mean_tokens: float  # per pair as a step runs it: the prompt once when shared, else twice
    mean_completion: float  # chosen + rejected tokens per pair (the positions scored)


def data_token_counts(config) -> TokenCounts:
    """`data.train`'s token counts, tokenized and truncated as training does (its cache too)."""

    dataset, _ = tokenized_split(config.data.train, load_tokenizer(config.model), config.data)
    columns = [dataset[name] for name in ("prompt_ids", "chosen_ids", "rejected_ids")]
    lengths = [(len(p), len(c), len(r)) for p, c, r in zip(*columns, strict=True)]
    prompt_copies = 1 if config.train.share_prompt else 2
    return TokenCounts(
        longest=RowLengths(
            shared_row=max(p + c + r for p, c, r in lengths),
            unshared_row=max(p + max(c, r) for p, c, r in lengths),
            completion=max(max(c, r) for _, c, r in lengths),
        ),
        pairs=len(lengths),
        mean_tokens=sum(prompt_copies * p + c + r for p, c, r in lengths) / len(lengths),
        mean_completion=sum(c + r for _, c, r in lengths) / len(lengths),
    )


def data_lengths(config) -> RowLengths:
    """The longest pair of `data.train`, tokenized and truncated as training does (its cache too)."""
    return data_token_counts(config).longest


@contextlib.contextmanager
def _fused_attention(outputs: list[int]):
    """sdpa as the fused kernels save for backward (q, k, v, output, log-sum-exp, mask), on meta;
    appends the bytes of each call's output and log-sum-exp to `outputs`."""

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask):
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            outputs.append(out.numel() * out.element_size() + lse.numel() * lse.element_size())
            ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
            return out

        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError("planning only")

    plain = torch.nn.functional.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return Fused.apply(q, k, v, attn_mask)

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = plain


def saved_by_layer(config, rows: int, tokens: int, shared: bool) -> tuple[int, int, int]:
    """(bytes one decoder layer saves for backward, bytes of one layer's input, bytes of one layer's
    attention output and log-sum-exp) for `rows` rows of `tokens` tokens, counted on the meta device."""
    from torch.multiprocessing.reductions import StorageWeakRef

    model = skeleton(config, layers=2, dtype=torch_dtype(config.model.dtype))  # the compute dtype
    skeleton_fused(model, config.model)  # model.fused_lora keeps other tensors than PEFT's layers
    model.train()
    params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    layers = model.get_base_model().model.layers
    scope, saved, inputs = [None], {}, {}

    def entering(index: int):
        def hook(module, args, kwargs) -> None:
            scope[0] = index
            inputs.setdefault(index, args[0] if args else kwargs["hidden_states"])

        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(entering(index), with_kwargs=True)
        layer.register_forward_hook(lambda *_: scope.__setitem__(0, None))
    # DoRA dequantizes its base weight: what it saves of it (with dropout, PEFT reruns the base
    # matmul on the dropped input) is a fresh [out, in] copy a layer on a quantized base, where
    # the empty model's weight is a parameter.
    in_dora, dequantized = [False], set()
    if config.lora.dora and config.model.quantization != "none":
        for module in model.modules():
            if hasattr(module, "lora_magnitude_vector") and hasattr(module, "get_base_layer"):
                dequantized.add(StorageWeakRef(module.get_base_layer().weight.untyped_storage()))
                for dora in module.lora_magnitude_vector.values():
                    dora.register_forward_pre_hook(lambda *_: in_dora.__setitem__(0, True))
                    dora.register_forward_hook(lambda *_: in_dora.__setitem__(0, False))

    def pack(tensor):
        key = StorageWeakRef(tensor.untyped_storage())
        if scope[0] == 1 and (key not in params or (in_dora[0] and key in dequantized)):
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.zeros(rows, tokens, dtype=torch.long, device="meta")
    positions = torch.zeros(rows, tokens, dtype=torch.long, device="meta")
    dtype = torch_dtype(config.model.dtype)
    # Shared prompts get an additive float mask; padded rows a boolean one (what sdpa receives).
    mask = torch.zeros(rows, 1, tokens, tokens, device="meta", dtype=dtype if shared else torch.bool)
    attention_outputs = []
    with _fused_attention(attention_outputs), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)  # fmt: skip
    # What a graph the forward dropped had saved is gone by the backward (DoRA's B @ A, formed
    # through an identity matrix and detached, saves an [in, in] identity a layer): not counted.
    kept = sum(size for key, size in saved.items() if not key.expired())
    del hidden
    layer_input = inputs[1]
    return kept, layer_input.numel() * layer_input.element_size(), attention_outputs[1]


def activation_components(
    config, hidden: int, vocab: int, layers: int, shared: bool, lengths: RowLengths | None = None, zero_stage: int = 0
) -> tuple[dict[str, int], int, int, dict[str, int]]:
    """(device components, tokens per row, rows, host components) for one micro-batch's policy forward
    and backward, its rows as long as `lengths` (default: the worst case of `data.max_length`), under
    `zero_stage`. With model.offload_activations the layer inputs are the host's, but for the one back
    on the device for its layer's recompute."""

    micro = config.train.micro_batch_size
    lengths = lengths or RowLengths.worst_case(config.data.max_length)
    rows, tokens = (micro, lengths.shared_row) if shared else (2 * micro, lengths.unshared_row)
    tokens = padded_width(tokens, config.train.pad_to_multiple_of)  # what the collate pads a row to
    per_layer, layer_input, attention_output = saved_by_layer(config, rows, tokens, shared)
    element = torch.tensor([], dtype=torch_dtype(config.model.dtype)).element_size()
    if float32_residual(config.model):
        # The residual stream (each layer's input) and the head run in float32; inside a layer
        # autocast keeps what backward saves in bf16, as the bf16 meta forward counts it.
        layer_input, element = layer_input * 4 // element, 4
    checkpointed = (
        checkpointed_count(config.model.checkpoint_layers, layers) if config.model.gradient_checkpointing else 0
    )
    components, host = {}, {}
    if checkpointed and config.model.offload_activations:  # every layer checkpoints (config.validate)
        host["offloaded layer inputs (model.offload_activations)"] = checkpointed * layer_input
        components["one layer's input, back for its recompute"] = layer_input
    elif checkpointed:
        # The first layers checkpoint, so backward frees every later layer's activations before the
        # first recompute: a recompute adds to the peak only when every layer checkpoints.
        components = {"checkpointed activations (layer inputs)": checkpointed * layer_input}
    if checkpointed:
        if checkpointed == layers:
            components["one-layer recompute peak"] = per_layer
        if keeps_attention_outputs(config.model, zero_stage):
            components["kept attention outputs"] = checkpointed * attention_output
    if checkpointed < layers:
        components[
            "activations (every layer's saved tensors)"
            if checkpointed == 0
            else "activations of the layers not checkpointed"
        ] = (layers - checkpointed) * per_layer
    if config.lora.dora:
        components["DoRA weight-norm transient"] = dora_transient(config)
    scored = 2 * micro * lengths.completion  # completion positions scored, at most
    chunk = min(config.train.logps_chunk_size, scored) if config.train.logps_chunk_size > 0 else scored
    components["LM-head chunk transient"] = lm_head_transient(chunk, vocab, scored, rows * tokens, hidden, element)
    return components, tokens, rows, host


def dora_transient(config) -> int:
    """Peak bytes of PEFT's DoRA weight norm in one adapted layer, the largest: B @ A formed through
    an [in, in] float32 identity, then float32 [out, in] matrices for it, the base weight, the
    scaled product and their sum (read off PEFT's forward, not counted: it runs on real weights)."""
    from peft.tuners.lora import LoraLayer

    layer = skeleton(config, layers=1)
    shapes = [m.get_base_layer().weight.shape for m in layer.modules() if isinstance(m, LoraLayer)]
    return max((4 * (shape[1] ** 2 + 4 * shape[0] * shape[1]) for shape in shapes), default=0)


def lm_head_transient(chunk: int, vocab: int, scored: int, positions: int, hidden: int, element: int) -> int:
    """Peak bytes of the chunked head (dpo_lora/model/chunked_logps.py), a frozen head's: the scored
    hidden states and their gradient direction ([scored, hidden] each), with either a chunk's
    logits (forward, LOGIT_BYTES each) or the gradient of every position's final hidden state
    (backward)."""
    return 2 * scored * hidden * element + max(int(chunk * vocab * LOGIT_BYTES[element]), positions * hidden * element)


def text_config_of(config):
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    text_config = model_config.get_text_config()
    kernel = config.model.attn_implementation
    text_config._attn_implementation = "sdpa" if kernel == "auto" else kernel  # what auto picks for these models
    return text_config


def activations_of(
    config, text_config, lengths: RowLengths | None = None, zero: ZeroSettings | None = None
) -> tuple[dict[str, int], int, int, dict[str, int]]:

    # The layout training will use (dpo_lora.data.layout.batch_layout decides it the same way).
    reason = unsupported_reason(SimpleNamespace(config=text_config), config.data.max_length)
    shared = config.train.share_prompt and reason is None
    hidden, vocab, layers = text_config.hidden_size, text_config.vocab_size, text_config.num_hidden_layers
    stage = (zero or zero_settings(config)).stage
    return activation_components(config, hidden, vocab, layers, shared, lengths, stage)


def zero_settings(config) -> ZeroSettings:
    """The ZeRO settings of `config.deepspeed`'s JSON."""
    return ZeroSettings.of(read_json(config.deepspeed).get("zero_optimization", {}))


def plan(config, world_size: int = 1, lengths: RowLengths | None = None, zero: ZeroSettings | None = None) -> Plan:
    """The per-rank memory of `config`'s run on `world_size` ranks, its rows as long as `lengths`
    (default: the worst case of `data.max_length`), under `zero` (default: `config.deepspeed`'s)."""

    zero = zero or zero_settings(config)
    components, host, lora_numel = weight_components(config, zero, world_size)
    optimizer, optimizer_host = optimizer_components(lora_numel, zero, world_size)
    activations, tokens, rows, activations_host = activations_of(config, text_config_of(config), lengths, zero)
    components |= optimizer | activations
    if config.dpo.sync_reference_every:  # TR-DPO's frozen reference adapter, partitioned as the policy's
        components["reference adapter (dpo.sync_reference_every)"] = optimizer["LoRA parameters"]
    components["fixed overhead (CUDA context, workspaces)"] = FIXED_OVERHEAD
    return Plan(components, tokens, rows, host | optimizer_host | activations_host)
