"""A merged model folder (safetensors) as one GGUF file, for llama.cpp and Ollama.

Llama-family models (`LlamaForCausalLM`) only, written with the `gguf` package's writer and its
tensor-name map: the architecture's hyperparameters, the byte-level BPE tokenizer (tokens, merges,
special ids) and the chat template, then the tensors in the merged folder's order, each read from
its memory-mapped shard, converted and written before the next is read. Peak memory is about one
tensor in float32 and its converted copy (a 7B's largest, the embedding: 0.5 GB in float32).

Conversions, as llama.cpp's own loader expects them: q and k projections have their rows permuted
from Hugging Face's rotate-half rotary layout to GGUF's interleaved one; 1-D tensors (norms) stay
float32; 2-D weights become `f16`, or `q8_0` (blocks of 32 int8 values with one float16 scale)
where their rows split into such blocks (else f16). `q2_k` to `q5_k_m` are llama.cpp's mixes of
the k-quants (dpo_lora.model.kquants, dpo_lora.model.lowbit_quants; which tensor gets which type:
dpo_lora.model.gguf_mixes), with llama.cpp's fallbacks where rows do not split into 256-value
super-blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dpo_lora.core.errors import UserError
from dpo_lora.model import kquants, lowbit_quants
from dpo_lora.model.gguf_mixes import stored_type
from dpo_lora.model.weight_files import WeightFolder

SUPPORTED = ("LlamaForCausalLM",)
OUR_QUANTIZERS = {
    "Q2_K": lowbit_quants.quantize_q2_k, "Q3_K": lowbit_quants.quantize_q3_k, "IQ4_NL": lowbit_quants.quantize_iq4_nl,
    "Q4_K": kquants.quantize_q4_k, "Q5_K": kquants.quantize_q5_k, "Q6_K": kquants.quantize_q6_k,
}  # fmt: skip


def gguf_name(name: str, gguf_type: str) -> str:
    return f"{name or 'model'}-{gguf_type}.gguf"


def check_supported(config: dict) -> None:
    """A one-line UserError for what this writer cannot express."""
    architecture = (config.get("architectures") or ["(none in config.json)"])[0]
    if architecture not in SUPPORTED:
        raise UserError(
            f"--format gguf: architecture {architecture} is not supported yet ({', '.join(SUPPORTED)} only)"
        )
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"--format gguf: rope scaling '{kind}' is not supported yet (plain RoPE only)")


def rope_theta(config: dict) -> float:
    """RoPE's base: top-level in older config.json files, under `rope_parameters` in newer ones."""
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def write_gguf(folder: Path, out_file: Path, gguf_type: str, name: str) -> dict:
    """Write the merged model in `folder` to `out_file`; returns {"tensors", "bytes", "gguf_type"}."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    check_supported(config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{gguf_type.upper()}")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, folder, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    weights = WeightFolder(folder)
    tied_head = _tied_head(weights.names(), names)
    plan = []
    for hf_name in weights.names():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"--format gguf: no GGUF name for tensor {hf_name}")
        shape = tuple(weights.shape(hf_name))
        qtype = _storage_type(shape, gguf_type, target, config, tied_head)
        nbytes = _nbytes(shape, qtype)
        writer.add_tensor_info(target, _byte_shape(shape, qtype), _numpy_dtype(qtype), nbytes, raw_dtype=qtype)
        plan.append((hf_name, qtype))
    writer.write_header_to_file(path=out_file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, qtype in plan:
        tensor = weights[hf_name].float()
        if hf_name.endswith("q_proj.weight"):
            tensor = _interleave_rotary(tensor, heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _interleave_rotary(tensor, kv_heads)
        writer.write_tensor_data(_convert(tensor, qtype))
        del tensor
    writer.close()
    return {"gguf_type": gguf_type, "tensors": len(plan), "bytes": out_file.stat().st_size}


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order (each head's first half of dimensions, then
    its second) to interleaved pairs (0, d/2, 1, d/2 + 1, ...), as GGUF's llama rotary reads them."""
    out_features = weight.shape[0]
    half = out_features // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _storage_type(shape: tuple[int, ...], gguf_type: str, target: str, config: dict, tied_head: bool):
    """The GGMLQuantizationType tensor `target` (its GGUF name) is stored as (dpo_lora.model.gguf_mixes)."""
    import gguf

    heads = config["num_attention_heads"]
    gqa = heads // (config.get("num_key_value_heads") or heads)
    kind = stored_type(shape, gguf_type, target, config["num_hidden_layers"], gqa, tied_head)
    return gguf.GGMLQuantizationType[kind]


def _tied_head(hf_names, names) -> bool:
    """Whether the file holds no head (`output.weight`): the embedding is then also the head."""
    return all(names.get_name(name, try_suffixes=(".weight", ".bias")) != "output.weight" for name in hf_names)


def _numpy_dtype(qtype):
    import gguf

    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)


def _byte_shape(shape: tuple[int, ...], qtype) -> tuple[int, ...]:
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return shape
    return gguf.quant_shape_to_byte_shape(shape, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * block_bytes


def _convert(tensor: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    array = tensor.numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    ours = OUR_QUANTIZERS.get(qtype.name)  # the types gguf reads but cannot write
    return ours(array) if ours else gguf.quants.quantize(array, qtype)


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """The byte-level BPE vocabulary (special tokens as control tokens), merges, special ids and the
    chat template; ids past the tokenizer's up to the embedding's rows are unused padding tokens."""
    import gguf

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    try:
        vocab = gguf.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"--format gguf: the tokenizer is not a byte-level BPE this writer handles ({err})") from None
    special = {token["id"] for token in tokenizer_json.get("added_tokens", []) if token.get("special")}
    tokens, types = [], []
    for index, (text, _, kind) in enumerate(vocab.all_tokens()):
        tokens.append(text.decode() if isinstance(text, bytes) else text)
        types.append(gguf.TokenType.CONTROL if index in special else kind)
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    if (pre := pre_tokenizer(tokenizer_json)) is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization: `gpt-2` for a plain byte-level one with
    GPT-2's split (SmolLM2's); None (llama.cpp then uses its default, and warns) for others."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def modelfile(gguf_file: str, eos_token: str | None) -> str:
    """The Ollama Modelfile that serves the GGUF (Ollama reads the chat template from the file)."""
    lines = [f"FROM ./{gguf_file}"]
    if eos_token:
        lines.append(f'PARAMETER stop "{eos_token}"')
    return "\n".join(lines) + "\n"


# Largest per-token log-prob difference of the GGUF, as transformers loads it, against the merged
# model with each weight as the file stores it (quantized and dequantized by the same code): what is
# left is the arithmetic's order, so one tolerance serves every type. On a SmolLM2-135M run's ~150
# probe tokens it was 1e-5 to 3e-5 for every type; a wrong rotary layout moved it by 9.6 nats.
GGUF_TOLERANCE = 0.01


def _stored_weights(weight_of, folder: Path, gguf_type: str):
    """weight_of giving each weight as the GGUF of `gguf_type` stores it, back in float32."""
    import gguf

    from dpo_lora.model.layerwise import tied_aliases

    config = json.loads((folder / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    files, tied = WeightFolder(folder), tied_aliases(folder)
    tied_head = _tied_head(files.names(), names)

    def stored(name: str) -> torch.Tensor:
        tensor = weight_of(name).float()
        # A tied head is not in the file: the model reads its twin, stored as the twin's type.
        written = tied[name] if name not in files and name in tied else name
        target = names.get_name(written, try_suffixes=(".weight", ".bias"))
        qtype = _storage_type(tuple(tensor.shape), gguf_type, target, config, tied_head)
        if qtype == gguf.GGMLQuantizationType.F32:
            return tensor
        return torch.from_numpy(gguf.quants.dequantize(_convert(tensor, qtype), qtype)).reshape(tensor.shape)

    return stored


def verify_gguf(gguf_file: Path, merged: Path, gguf_type: str) -> dict:
    """Teacher-forced log-probs of the GGUF as transformers loads it (dequantized to float32, the
    whole model in memory) against the merged folder it was written from (streamed by module): with
    its weights as the file stores them (the check), and in float32 (what the storage costs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lora.model.layerwise import batch_token_logps, folder_weights, streamed_model, tied_aliases
    from dpo_lora.model.verify import differences, probe_batches, token_logps

    batches = probe_batches(AutoTokenizer.from_pretrained(str(merged)))
    weights = folder_weights(WeightFolder(merged), tied_aliases(merged))
    reference = batch_token_logps(streamed_model(merged, weights, None), batches)
    as_stored = batch_token_logps(streamed_model(merged, _stored_weights(weights, merged, gguf_type), None), batches)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # The same ids for the probe texts, the chat-templated ones too: tokens, merges and template carried over.
    same_tokens = [ids.tolist() for ids in probe_batches(tokenizer)] == [ids.tolist() for ids in batches]
    scores = token_logps(loaded, batches)
    largest, mean = differences(scores, reference)
    return {
        "gguf_tolerance": GGUF_TOLERANCE,
        "max_logp_diff_gguf_vs_stored": differences(scores, as_stored)[0],
        "max_logp_diff_gguf_vs_merged": largest,
        "mean_logp_diff_gguf_vs_merged": mean,
        "gguf_tokenizer_matches": same_tokens,
    }
