"""`dpo-lora export --format gguf`: one GGUF file that transformers loads (the loader llama.cpp-format
files get in Python) with the merged model's log-probs and the same tokenizer; unsupported
architectures refused in one line. The real SmolLM2 run's GGUF is in test_integration_smollm2.py."""

from __future__ import annotations

import json
import shutil

import pytest

from dpo_lora.cli import main
from dpo_lora.commands.export import export_model
from dpo_lora.model.gguf_export import GGUF_TOLERANCE
from dpo_lora.train.loop import train

from ..train.test_loop import tiny_config
from .test_export import RUN


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "run"
    train(tiny_config(tiny_model_dir, out, *RUN))
    return out


@pytest.fixture(scope="module")
def sharp_base(tiny_model_dir, tmp_path_factory):
    """The tiny base with its q and k projections scaled up 30x and RoPE's base at 1e5: the random
    model's attention is then far from uniform, so a wrong rotary layout or base in the GGUF changes
    the log-probs (at the tiny model's own scale they barely would)."""
    from safetensors.torch import load_file, save_file

    base = tmp_path_factory.mktemp("sharp") / "base"
    shutil.copytree(tiny_model_dir, base)
    tensors = load_file(base / "model.safetensors")
    for name in tensors:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[name] = tensors[name] * 30
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())  # and not RoPE's default base (as SmolLM2's)
    if "rope_parameters" in config:
        config["rope_parameters"]["rope_theta"] = 100000.0
    else:
        config["rope_theta"] = 100000.0
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q5_0", "q4_0"])
def test_a_gguf_export_loads_in_transformers_with_the_merged_models_log_probs(
    tiny_run,
    sharp_base,
    tmp_path,
    gguf_type,
):
    import gguf

    out = tmp_path / "gguf"
    report = export_model(str(tiny_run), out=str(out), base=str(sharp_base), format="gguf", gguf_type=gguf_type)
    assert sorted(p.name for p in out.iterdir()) == sorted(["Modelfile", "export_report.json", report["gguf_file"]])
    assert report["gguf_tokenizer_matches"] is True  # the ids of plain and chat-templated probes
    # Against the merge with its weights as stored: equal but for the arithmetic's order. Against the
    # float32 merge: what the storage costs, more for fewer bits.
    assert report["max_logp_diff_gguf_vs_stored"] <= GGUF_TOLERANCE
    assert report["max_logp_diff_gguf_vs_stored"] < report["max_logp_diff_gguf_vs_merged"] / 10
    assert report["max_logp_diff_gguf_vs_merged"] < {"f16": 0.1, "q8_0": 0.5, "q5_0": 3.0, "q4_0": 6.0}[gguf_type]
    assert report["max_logp_diff_vs_claimed"] <= report["tolerance"]  # the merge itself, checked as always
    reader = gguf.GGUFReader(out / report["gguf_file"])
    fields = {
        name: field.contents()
        for name, field in reader.fields.items()
        if name.startswith(("general", "llama", "tokenizer.chat"))
    }
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # llama.cpp's name for this split
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.ffn_up.weight"] == gguf_type.upper()
    bits = {"f16": "F16", "q8_0": "Q8_0", "q5_0": "Q8_0", "q4_0": "Q8_0"}[gguf_type]
    assert kinds["token_embd.weight"] == kinds["output.weight"] == bits, "embedding and head stay 8-bit under 4 and 5"
    assert (out / "Modelfile").read_text() == f'FROM ./{report["gguf_file"]}\nPARAMETER stop "<|im_end|>"\n'


def test_a_wrong_rotary_layout_fails_the_check_and_writes_nothing(tiny_run, sharp_base, tmp_path, monkeypatch, capsys):
    """The q/k row permutation is what makes the log-probs match: without it the check refuses."""
    import dpo_lora.model.gguf_export as gguf_export

    monkeypatch.setattr(gguf_export, "_interleave_rotary", lambda weight, heads: weight)
    args = ["export", str(tiny_run), "--out", str(tmp_path / "bad"), "--base", str(sharp_base), "--format", "gguf"]
    assert main(args) == 2
    assert "GGUF export failed verification" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_an_unsupported_architecture_is_one_line_naming_it(tiny_run, tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "qwen-like"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    args = ["export", str(tiny_run), "--out", str(tmp_path / "out"), "--base", str(base), "--format", "gguf"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "dpo-lora: error: --format gguf: architecture Qwen2ForCausalLM is not supported yet (LlamaForCausalLM only)"
    )


@pytest.fixture(scope="module", params=[False, True], ids=["head", "tied"])
def wide_run(tiny_tokenizer, tmp_path_factory, request):
    """A run on a two-layer Llama whose rows split into k-quants' 256-value super-blocks; its head
    its own, or tied to the embedding (as SmolLM2's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide") / "base"
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=request.param)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = folder.parent / "run"
    train(tiny_config(folder, out, *RUN))
    return out


@pytest.mark.parametrize("gguf_type", ["q4_k_m", "q5_k_m"])
def test_k_quant_mixes_store_llama_cpps_types_and_load_with_the_merged_models_log_probs(wide_run, tmp_path, gguf_type):
    """q4_k_m (q5_k_m): Q6_K for the head and for attn_v and ffn_down in llama.cpp's layers (of
    two: the second), Q4_K (Q5_K) elsewhere, the embedding too; transformers reads the file back (with gguf's
    dequantizers) with the log-probs of the merge as stored. (Each type's error against the legacy
    types is in tests/model/test_kquants.py; this mix's 4-bit embedding, as llama.cpp's, costs
    more on this random model than q4_0's 8-bit one.)"""
    import gguf

    report = export_model(str(wide_run), out=str(tmp_path / "out"), format="gguf", gguf_type=gguf_type)
    assert report["max_logp_diff_gguf_vs_stored"] <= GGUF_TOLERANCE
    assert report["max_logp_diff_gguf_vs_stored"] < report["max_logp_diff_gguf_vs_merged"] / 10
    assert report["max_logp_diff_gguf_vs_merged"] < 3.0 and report["gguf_tokenizer_matches"] is True
    reader = gguf.GGUFReader(tmp_path / "out" / report["gguf_file"])
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{gguf_type.upper()}")
    body = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K"}[gguf_type]
    tied = "output.weight" not in kinds  # the embedding is the head: stored as the head (llama.cpp's rule)
    assert (kinds.get("output.weight"), kinds["token_embd.weight"]) == ((None, "Q6_K") if tied else ("Q6_K", body))
    assert tied == (json.loads((wide_run.parent / "base" / "config.json").read_text())["tie_word_embeddings"])
    assert (kinds["blk.0.attn_v.weight"], kinds["blk.1.attn_v.weight"]) == (body, "Q6_K")
    assert (kinds["blk.0.ffn_down.weight"], kinds["blk.1.ffn_down.weight"]) == (body, "Q6_K")
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_up.weight"] == body


@pytest.mark.parametrize(("gguf_type", "body"), [("q4_k_m", "Q5_0"), ("q5_k_m", "Q5_1")])
def test_k_quant_mixes_fall_back_as_llama_cpp_does_where_rows_are_not_256_wide(tiny_run, tmp_path, gguf_type, body):
    """The tiny model's rows are 64 and 128 wide: Q4_K falls back to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0."""
    import gguf

    report = export_model(str(tiny_run), out=str(tmp_path / "out"), format="gguf", gguf_type=gguf_type)
    assert report["max_logp_diff_gguf_vs_stored"] <= GGUF_TOLERANCE
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "out" / report["gguf_file"]).tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == body
    assert kinds["output.weight"] == kinds["blk.1.attn_v.weight"] == "Q8_0"


@pytest.mark.parametrize(
    ("gguf_type", "expected"),
    [  # blk.N tensor -> type, for a 32-layer model (llama.cpp's llama_tensor_get_type for Llama)
        (
            "q2_k",
            {
                "0.attn_v": "Q3_K",
                "0.ffn_down": "Q3_K",
                "0.attn_output": "Q3_K",
                "0.attn_q": "Q2_K",
                "31.ffn_up": "Q2_K",
            },
        ),  # fmt: skip
        ("q3_k_s", {"0.attn_v": "Q3_K", "0.ffn_down": "Q3_K", "0.attn_output": "Q3_K"}),
        (
            "q3_k_m",
            {
                "1.attn_v": "Q5_K",
                "2.attn_v": "Q4_K",
                "1.ffn_down": "Q5_K",
                "2.ffn_down": "Q4_K",
                "9.attn_output": "Q4_K",
                "9.attn_k": "Q3_K",
            },
        ),  # fmt: skip
        ("q3_k_l", {"9.attn_v": "Q5_K", "9.ffn_down": "Q5_K", "9.attn_output": "Q5_K", "9.ffn_gate": "Q3_K"}),
        (
            "q4_k_s",
            {
                "3.attn_v": "Q5_K",
                "4.attn_v": "Q4_K",
                "3.ffn_down": "Q5_K",
                "4.ffn_down": "Q4_K",
                "0.attn_output": "Q4_K",
            },
        ),  # fmt: skip
        (
            "q4_k_m",
            {"3.attn_v": "Q6_K", "4.attn_v": "Q4_K", "6.ffn_down": "Q6_K", "7.ffn_down": "Q4_K", "28.attn_v": "Q6_K"},
        ),  # fmt: skip
        ("q5_k_s", {"0.attn_v": "Q5_K", "0.ffn_down": "Q5_K"}),
        ("iq4_nl", {"0.attn_v": "IQ4_NL", "3.ffn_down": "Q5_K", "4.ffn_down": "IQ4_NL", "0.attn_output": "IQ4_NL"}),
    ],
)
def test_each_mix_gives_llama_cpps_types_by_tensor_and_layer(gguf_type, expected):
    from dpo_lora.model.gguf_mixes import mixed_type

    for where, kind in expected.items():
        layer, tensor = where.split(".")
        assert mixed_type(gguf_type, f"blk.{layer}.{tensor}.weight", 32, 1, head=False) == kind, where
    assert mixed_type(gguf_type, "output.weight", 32, 1, head=True) == "Q6_K"
    body = {"q2_k": "Q2_K", "q5_k_s": "Q5_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "iq4_nl": "IQ4_NL"}.get(
        gguf_type, "Q3_K"
    )
    assert mixed_type(gguf_type, "token_embd.weight", 32, 1, head=False) == body
    if gguf_type in ("q2_k", "iq4_nl"):  # grouped-query attention (Llama-3-8B: 4 query heads per key/value head)
        assert mixed_type(gguf_type, "blk.0.attn_v.weight", 32, 4, head=False) == {"q2_k": "Q4_K"}.get(
            gguf_type, "Q5_K"
        )


@pytest.mark.parametrize("gguf_type", ["q2_k", "q3_k_m", "iq4_nl"])
def test_low_bit_mixes_load_with_the_merged_models_log_probs(wide_run, tmp_path, gguf_type):
    """q2_k, q3_k_m and iq4_nl on the 256-wide model: each tensor stored as the mix says, and transformers reads
    the file back (gguf's dequantizers) with the log-probs of the merge as stored."""
    import gguf

    from dpo_lora.model.gguf_mixes import stored_type

    report = export_model(str(wide_run), out=str(tmp_path / "out"), format="gguf", gguf_type=gguf_type)
    assert report["max_logp_diff_gguf_vs_stored"] <= GGUF_TOLERANCE
    assert report["max_logp_diff_gguf_vs_stored"] < report["max_logp_diff_gguf_vs_merged"] / 10
    reader = gguf.GGUFReader(tmp_path / "out" / report["gguf_file"])
    assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{gguf_type.upper()}")
    tied = "output.weight" not in {t.name for t in reader.tensors}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        assert t.tensor_type.name == stored_type(shape, gguf_type, t.name, 2, 2, tied), t.name
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == {"q2_k": "Q2_K", "q3_k_m": "Q3_K", "iq4_nl": "IQ4_NL"}[gguf_type]
    assert kinds["blk.0.attn_v.weight"] == {"q2_k": "Q3_K", "q3_k_m": "Q5_K", "iq4_nl": "IQ4_NL"}[gguf_type]


def test_low_bit_mixes_fall_back_to_iq4_nl_where_rows_are_not_256_wide(tiny_run, tmp_path):
    import gguf

    report = export_model(str(tiny_run), out=str(tmp_path / "out"), format="gguf", gguf_type="q3_k_m")
    assert report["max_logp_diff_gguf_vs_stored"] <= GGUF_TOLERANCE
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "out" / report["gguf_file"]).tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == "IQ4_NL"  # Q3_K's fallback
    assert kinds["blk.0.attn_v.weight"] == "Q5_1" and kinds["output.weight"] == "Q8_0"  # Q5_K's and Q6_K's
