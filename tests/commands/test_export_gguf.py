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
