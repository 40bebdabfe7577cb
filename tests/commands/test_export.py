"""Export: merged models load with plain transformers and equal what they claim to equal."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import dpo_lora.commands.export as export_module
from dpo_lora.commands.export import export_model, parse_size
from dpo_lora.core.errors import UserError
from dpo_lora.core.rundir import step_name
from dpo_lora.core.schema import ModelConfig
from dpo_lora.model.load import load_base
from dpo_lora.model.verify import differences, probe_batches, token_logps
from dpo_lora.train.loop import train

from ..conftest import REPO
from ..train.test_loop import tiny_config

RUN = [
    "train.max_steps=6",
    "train.micro_batch_size=4",
    "data.eval=null",
    "train.lr=2e-2",
    "train.save_every=3",
    "train.keep_checkpoints=0",
]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(tiny_model_dir, out, *RUN))
    return out


def scores(model, tokenizer):
    return token_logps(model, probe_batches(tokenizer))


def test_original_merge_loads_plainly_and_equals_base_plus_adapter(trained_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    report = export_model(str(trained_run), out=str(out), dtype="float32")
    assert report["merged"] == 14 and report["max_logp_diff_vs_claimed"] < 1e-4
    assert "max_logp_diff_vs_trained" in report  # what serving the original base costs
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and not hasattr(merged.config, "quantization_config")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(trained_run / "adapter"))
    largest, _ = differences(scores(merged, tokenizer), scores(reference, tokenizer))
    assert largest < 1e-4
    unadapted = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert differences(scores(merged, tokenizer), scores(unadapted, tokenizer))[0] > 1e-2, "the adapter must be in"


def test_dequantized_merge_equals_the_trained_quantized_model(trained_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = export_model(str(trained_run), out=str(tmp_path / "deq"), dtype="float32", merge_into="dequantized")
    assert report["max_logp_diff_vs_claimed"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "deq")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "deq")
    quantized = load_base(
        ModelConfig(path=str(tiny_model_dir), quantization="nf4", dtype="float32"), torch.device("cpu")
    )
    trained = PeftModel.from_pretrained(quantized, str(trained_run / "adapter"))
    assert differences(scores(merged, tokenizer), scores(trained, tokenizer))[0] < 1e-4
    export_model(str(trained_run), out=str(tmp_path / "orig"), dtype="float32")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "orig")
    assert differences(scores(merged, tokenizer), scores(original, tokenizer))[0] > 1e-3, (
        "the two targets differ by the quantization error"
    )


def test_shards_and_index_are_consistent(trained_run, tmp_path):
    out = tmp_path / "sharded"
    report = export_model(str(trained_run), out=str(out), dtype="bfloat16", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(report["files"]) > 2 and sorted(set(index["weight_map"].values())) == report["files"]
    seen, total = {}, 0
    for file in report["files"]:
        with safe_open(str(out / file), framework="pt") as shard:
            for name in shard.keys():
                seen[name] = file
                tensor = shard.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
                assert tensor.dtype == torch.bfloat16
    assert seen == index["weight_map"] and total == index["metadata"]["total_size"]


def test_checkpoints_of_zero_stages_export_like_the_final_adapter(tiny_model_dir, trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = export_model(str(trained_run), out=str(tmp_path / "final"), dtype="float32")
    from_checkpoint = export_model(
        str(trained_run / "checkpoints" / step_name(6)), out=str(tmp_path / "ckpt"), dtype="float32"
    )
    assert from_checkpoint["merged"] == final["merged"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    a = scores(AutoModelForCausalLM.from_pretrained(tmp_path / "final"), tokenizer)
    b = scores(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), tokenizer)
    assert differences(a, b)[0] == 0.0
    zero0 = tmp_path / "zero0-run"
    train(tiny_config(tiny_model_dir, zero0, *RUN, f"deepspeed={REPO / 'deepspeed_configs' / 'zero0.json'}"))
    mid = export_model(str(zero0 / "checkpoints" / step_name(3)), out=str(tmp_path / "zero0"), dtype="float32")
    assert mid["max_logp_diff_vs_claimed"] < 1e-4


def test_adapter_only_refusals_and_push(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    export_model(str(trained_run), out=str(out), adapter_only=True)
    assert (out / "adapter_model.safetensors").is_file() and "dpo-lora" in (out / "README.md").read_text()
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        export_model(str(trained_run), out=str(out), adapter_only=True)
    # A merge that went wrong (here: the adapter scaled twice) fails verification; nothing is written.
    real = export_module.lora_deltas
    monkeypatch.setattr(
        export_module,
        "lora_deltas",
        lambda *a: {k: dataclasses.replace(d, scale=2 * d.scale) for k, d in real(*a).items()},
    )
    with pytest.raises(UserError, match="failed verification"):
        export_model(str(trained_run), out=str(tmp_path / "bad"), dtype="float32")
    assert not (tmp_path / "bad").exists()
    monkeypatch.undo()
    with pytest.raises(UserError, match="--push someone/model: cannot upload to the Hugging Face Hub"):
        export_model(str(trained_run), out=str(tmp_path / "pushed"), adapter_only=True, push="someone/model")
    assert (tmp_path / "pushed" / "adapter_model.safetensors").is_file(), "the export itself is kept"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KB") == 40_000 and parse_size("2MiB") == 2 * 2**20
    assert parse_size("1.5TB") == 1.5e12 and parse_size("1tib") == 2**40
    with pytest.raises(UserError, match="--max-shard-size"):
        parse_size("five gigs")


def deep_model_run(folder, tokenizer, *, hidden: int, intermediate: int, layers: int):
    """A run folder (config.yaml, adapter/) over a random Llama saved in bfloat16; returns (run, float32 bytes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_lora.core.config import dump_yaml

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    float32_bytes = 4 * sum(p.numel() for p in model.parameters())
    adapted = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    adapted.save_pretrained(folder / "run" / "adapter")
    run_config = tiny_config(folder / "base", folder / "run", "model.quantization=nf4")
    (folder / "run" / "config.yaml").write_text(dump_yaml(run_config))
    return folder / "run", float32_bytes


def peak_anonymous_mb(args: list[str], log) -> float:
    """Run `dpo-lora ARGS` and sample its RssAnon (not RSS: mmapped shards are file pages) every few ms.
    A low fixed mmap threshold gives each tensor its own pages, returned when freed, so the peak is
    what was live rather than how glibc's heap fragmented (dpo_lora/core/cpu_memory.py)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "dpo_lora", *args], stdout=output, stderr=output, env=env)
        peak_kb = 0
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                break
            anon = [line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")]
            peak_kb = max([peak_kb, *map(int, anon)])
            time.sleep(0.003)
    assert process.wait() == 0, open(log).read()[-3000:]
    return peak_kb / 1024


@pytest.mark.parametrize("merge_into", ["dequantized", "original"])
def test_export_memory_grows_with_one_shard_not_with_the_model(tmp_path, tiny_tokenizer, merge_into):
    """A model 6.6x larger in float32 than the allowance exports (merge and verification) within
    it: the part of the peak that grows with the model is bounded by shard + a few largest tensors."""
    small_run, _ = deep_model_run(tmp_path / "small", tiny_tokenizer, hidden=64, intermediate=128, layers=2)
    large_run, large_bytes = deep_model_run(
        tmp_path / "large", tiny_tokenizer, hidden=512, intermediate=2048, layers=24
    )
    shard_mb, largest_tensor_mb = 16, 2048 * 512 * 4 / 2**20
    adapter_mb = (large_run / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    allowance_mb = shard_mb + adapter_mb + 8 * largest_tensor_mb  # the README's bound: 56 MB; the model is 370 MB
    peaks = {}
    for name, run in (("small", small_run), ("large", large_run)):
        args = ["export", str(run), "--out", str(tmp_path / f"{name}-out"), "--merge-into", merge_into,
                "--dtype", "bfloat16", "--max-shard-size", f"{shard_mb}MB"]  # fmt: skip
        peaks[name] = peak_anonymous_mb(args, tmp_path / f"{name}.log")
    grown_mb = peaks["large"] - peaks["small"]
    assert large_bytes / 2**20 > 4.5 * allowance_mb
    print(f"{merge_into}: {grown_mb:.1f} MB more for the large model (allowance {allowance_mb:.1f} MB)")
    assert grown_mb < allowance_mb, f"export held {grown_mb:.0f} MB more for the large model ({peaks})"
    assert json.loads((tmp_path / "large-out" / "export_report.json").read_text())["merged"] == 24 * 7


def test_an_export_spec_file_is_read_with_its_keys_checked(tmp_path, capsys):
    """`dpo-lora export --spec FILE` (what the service writes per export): unknown keys and a missing
    source are one-line errors naming the file."""
    from dpo_lora.cli import main
    from dpo_lora.commands.export import read_spec

    spec = tmp_path / "export.json"
    spec.write_text(json.dumps({"source": "runs/x", "out": "out", "merge_into": "original", "overwrite": True}))
    assert read_spec(str(spec)) == {"source": "runs/x", "out": "out", "merge_into": "original", "overwrite": True}
    spec.write_text(json.dumps({"source": "runs/x", "out": "out", "argv": ["--push", "me/x"]}))
    assert main(["export", "--spec", str(spec)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"dpo-lora: error: --spec {spec}: needs source and out")
    assert main(["export", "runs/x"]) == 2  # neither --out nor --spec


def test_an_rslora_run_exports_at_alpha_over_sqrt_r_as_peft_runs_it(tiny_model_dir, tmp_path):
    """`lora.rslora`: PEFT scales the adapter alpha / sqrt(r) in training and records use_rslora;
    the merge must use the same scale (alpha / r would give another model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, run, *RUN, "lora.rslora=true", "lora.r=4", "lora.alpha=8"))
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    export_model(str(run), out=str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(run / "adapter"))  # fmt: skip
    assert differences(scores(merged, tokenizer), scores(reference, tokenizer))[0] < 1e-4
    import shutil

    shutil.rmtree(
        run / "checkpoints" / step_name(6) / "adapter"
    )  # as older checkpoints: rebuilt from DeepSpeed's state
    export_model(str(run / "checkpoints" / step_name(6)), out=str(tmp_path / "ckpt"), dtype="float32")
    from_checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert differences(scores(from_checkpoint, tokenizer), scores(merged, tokenizer))[0] == 0.0
    settings = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**settings, "use_rslora": False}))
    half = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(run / "adapter"))  # fmt: skip
    assert differences(scores(merged, tokenizer), scores(half, tokenizer))[0] > 1e-3, "the scale matters here"


def test_lora_delta_merges_dora_as_its_layer_computes_in_float64():
    """DoRA's layer: y = m / ||W + s B A||_row * (W x + s B (A x)), a norm per output row. The merged
    weight, applied to x, must give that y (an oracle in float64 that never forms the merged matrix)."""
    from dpo_lora.commands.export import LoraDelta

    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(shape, generator=gen) for shape in ((6, 5), (3, 5), (6, 3)))
    magnitude, x = torch.rand(6, generator=gen) + 0.5, torch.randn(5, 4, generator=gen)
    w64, a64, b64, m64, x64 = (t.double() for t in (w, a, b, magnitude, x))
    direction = w64 + 0.7 * b64 @ a64
    norms = torch.sqrt((direction**2).sum(dim=1))
    oracle = (m64 / norms).unsqueeze(1) * (w64 @ x64 + 0.7 * b64 @ (a64 @ x64))
    assert torch.allclose(LoraDelta(a, b, 0.7, magnitude).merged(w).double() @ x64, oracle, atol=1e-5)
    plain = LoraDelta(a, b, 0.7).merged(w).double() @ x64
    assert torch.allclose(plain, w64 @ x64 + 0.7 * b64 @ (a64 @ x64), atol=1e-5)
    assert not torch.allclose(plain, oracle, atol=1e-2), "the magnitude must matter here"


def test_a_dora_run_exports_to_the_model_peft_runs(tiny_model_dir, tmp_path, monkeypatch):
    """`lora.dora`: PEFT trains a magnitude per output row. Both merge targets must give what PEFT
    computes (on the unquantized base for `original`, on the NF4 base as trained for `dequantized`),
    the checkpoint's rebuilt adapter must be the final one, and a merge without the magnitudes must
    fail verification."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lora.train.trained import adapter_state_from_checkpoint

    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, run, *RUN, "lora.dora=true", "lora.r=4", "lora.alpha=8"))
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    final = load_file(str(adapter / "adapter_model.safetensors"))
    assert sum(".lora_magnitude_vector" in name for name in final) == 14
    rebuilt = adapter_state_from_checkpoint(run / "checkpoints" / step_name(6))
    assert rebuilt.keys() == final.keys() and all(torch.equal(rebuilt[k], final[k]) for k in final)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    report = export_model(str(run), out=str(tmp_path / "orig"), dtype="float32")
    assert report["max_logp_diff_vs_claimed"] < 1e-4
    merged = scores(AutoModelForCausalLM.from_pretrained(tmp_path / "orig"), tokenizer)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), str(adapter))  # fmt: skip
    assert differences(merged, scores(peft, tokenizer))[0] < 1e-4
    export_model(str(run), out=str(tmp_path / "deq"), dtype="float32", merge_into="dequantized")
    quantized = load_base(ModelConfig(path=str(tiny_model_dir), quantization="nf4", dtype="float32"), torch.device("cpu"))  # fmt: skip
    trained = scores(PeftModel.from_pretrained(quantized, str(adapter)), tokenizer)
    assert differences(scores(AutoModelForCausalLM.from_pretrained(tmp_path / "deq"), tokenizer), trained)[0] < 1e-4

    real = export_module.lora_deltas
    monkeypatch.setattr(
        export_module,
        "lora_deltas",
        lambda *a: {k: dataclasses.replace(d, magnitude=None) for k, d in real(*a).items()},
    )
    with pytest.raises(UserError, match="failed verification"):
        export_model(str(run), out=str(tmp_path / "bad"), dtype="float32")
