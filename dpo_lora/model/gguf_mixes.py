"""Which type each tensor of a GGUF export is stored as: llama.cpp's mixes for its file types.

A mix names a body type and gives some tensors more bits: the head (or the embedding, when it is also
the head) Q6_K in every k-quant mix and in iq4_nl; attn_v, ffn_down and attn_output by layer, as llama.cpp's
`llama_tensor_get_type` does for Llama models. Where rows do not split into a type's blocks, llama.cpp's
fallback (Q2_K and Q3_K -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else F16. Not followed:
llama.cpp's rules for other architectures (Falcon, mixtures of experts) and for 70B models (whose attn_v
it raises to Q5_K in the 3- and 4-bit mixes), and importance matrices.
"""

from __future__ import annotations

GGUF_TYPES = (
    "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "iq4_nl", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s",
    "q2_k",
)  # fmt: skip
BODY = {
    "q2_k": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K",
    "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "f16": "F16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q4_0": "Q4_0",
    "iq4_nl": "IQ4_NL",
}  # fmt: skip
UNIFORM = ("f16", "q8_0", "q6_k", "q5_0", "q4_0")  # one type for every layer's tensors
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def mixed_type(gguf_type: str, target: str, layers: int, gqa: int, head: bool) -> str:
    """The type (a GGMLQuantizationType name) llama.cpp gives 2-D tensor `target` (its GGUF name) in a
    file of `gguf_type`, before any fallback: `layers` decoder layers, `gqa` query heads per key/value
    head, `head` whether the tensor is the output head (or the embedding tied to it)."""
    body = BODY[gguf_type]
    if gguf_type in ("q5_0", "q4_0") and target in ("token_embd.weight", "output.weight"):
        return "Q8_0"  # beside the legacy types the embedding and the head keep 8 bits
    if head:
        return "Q6_K" if body.endswith("_K") or body == "IQ4_NL" else body
    if gguf_type in UNIFORM or not target.startswith("blk."):  # one type throughout, or the embedding
        return body
    layer = int(target.split(".")[1])
    if target.endswith("attn_v.weight"):
        return {
            "q2_k": "Q4_K" if gqa >= 4 else "Q3_K",
            "q3_k_m": "Q5_K" if layer < 2 else "Q4_K",
            "q3_k_l": "Q5_K",
            "q4_k_m": "Q6_K" if more_bits(layer, layers) else body,
            "q5_k_m": "Q6_K" if more_bits(layer, layers) else body,
            "q4_k_s": "Q5_K" if layer < 4 else body,
            "iq4_nl": "Q5_K" if gqa >= 4 else body,
        }.get(gguf_type, body)
    if target.endswith("ffn_down.weight"):
        return {
            "q2_k": "Q3_K",
            "q3_k_m": "Q5_K" if layer < layers // 16 else "Q4_K",
            "q3_k_l": "Q5_K",
            "q4_k_m": "Q6_K" if more_bits(layer, layers) else body,
            "q5_k_m": "Q6_K" if more_bits(layer, layers) else body,
            "q4_k_s": "Q5_K" if layer < layers // 8 else body,
            "iq4_nl": "Q5_K" if layer < layers // 8 else body,
        }.get(gguf_type, body)
    if target.endswith("attn_output.weight"):
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(gguf_type, body)
    return body


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def stored_type(shape: tuple[int, ...], gguf_type: str, target: str, layers: int, gqa: int, tied_head: bool) -> str:
    """The type tensor `target` is stored as: F32 for 1-D tensors; else mixed_type where rows split
    into its blocks, else its fallback where they split into the fallback's, else F16."""
    import gguf

    if len(shape) < 2:
        return "F32"
    head = target == "output.weight" or (tied_head and target == "token_embd.weight")
    wanted = mixed_type(gguf_type, target, layers, gqa, head)
    for kind in (wanted, FALLBACK.get(wanted)):
        if kind == "F16" or (kind and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0] == 0):
            return kind
    return "F16"
