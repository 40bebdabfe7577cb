"""The training loop on the DeepSpeed engine (one CPU rank, gloo), on a tiny 4-bit model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dpo_lora.core.config import load_config
from dpo_lora.core.errors import UserError
from dpo_lora.train.loop import ADAPTER_DIR, EvalShard, train

from ..conftest import REPO, SENTIMENT_EVAL, SENTIMENT_TRAIN


def tiny_config(model_dir, output_dir, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.dtype=float32",
            "lora.dropout=0.0",
            f"data.train={SENTIMENT_TRAIN}",
            f"data.eval={SENTIMENT_EVAL}",
            "data.max_length=96",
            "data.max_prompt_length=64",
            f"deepspeed={REPO / 'deepspeed_configs' / 'zero2.json'}",
            f"output_dir={output_dir}",
            "train.lr=5e-3",
            "train.warmup_ratio=0",
            *overrides,
        ],
    )


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(output_dir) -> list[dict]:
    return [row for row in read_metrics(output_dir) if "loss" in row]


def test_micro_batch_times_accumulation_is_one_big_batch(tiny_model_dir, tmp_path):
    """... and padding every row to a multiple of 48 tokens trains the same (padding is masked out)."""
    runs = {}
    for micro, accum, multiple in ((4, 1, 0), (2, 2, 0), (1, 4, 0), (4, 1, 48)):
        out = tmp_path / f"m{micro}a{accum}p{multiple}"
        config = tiny_config(
            tiny_model_dir,
            out,
            "train.max_steps=3",
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            f"train.pad_to_multiple_of={multiple}",
            "data.eval=null",
        )
        train(config)
        runs[(micro, accum, multiple)] = (train_rows(out), load_file(out / ADAPTER_DIR / "adapter_model.safetensors"))
    reference_rows, reference_adapter = runs[(4, 1, 0)]
    padded_rows = runs[(4, 1, 48)][0]
    for unpadded, padded in zip(reference_rows, padded_rows, strict=True):
        assert padded["tokens"] == unpadded["tokens"]  # real tokens only
        assert 0 <= unpadded["padding_fraction"] < padded["padding_fraction"] < 1
    assert [r["loss"] for r in reference_rows][0] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
    for key, (rows, adapter) in runs.items():
        for row, expected in zip(rows, reference_rows, strict=True):
            for name in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected", "grad_norm"):
                assert row[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (key, name, row["step"])
        for name, tensor in adapter.items():
            # Adam divides by sqrt(v): float summation order can move a weight by a small
            # fraction of one step (lr = 5e-3), never more.
            torch.testing.assert_close(
                tensor, reference_adapter[name], rtol=1e-3, atol=2e-5, msg=lambda m, k=key, n=name: f"{k} {n}: {m}"
            )


def test_training_writes_metrics_adapter_and_config_and_improves(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    results = train(
        tiny_config(tiny_model_dir, out, "train.max_steps=12", "train.micro_batch_size=8", "train.log_every=3")
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [3, 6, 9, 12]
    expected_keys = {
        "step", "total_steps", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens", "pairs_per_s", "tokens_per_s",
        "pairs_per_s_per_rank", "padding_fraction", "world_size", "global_batch", "peak_memory_gb", "kind",  # kind: core/rundir.py
        "pairs", "lengths/chosen", "lengths/rejected", "logratios/chosen_per_token", "rewards/margin_length_corr",
    }  # fmt: skip
    assert all(set(r) == expected_keys and r["total_steps"] == 12 for r in rows if "loss" in r)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[0]["eval/rewards/accuracies"] == 0.0 and evals[0]["eval/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert evals[1]["eval/pairs"] == 64
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    assert results["after"]["eval/rewards/accuracies"] > 0.5
    assert load_config(out / "config.yaml").train.max_steps == 12
    assert (out / ADAPTER_DIR / "adapter_config.json").is_file()
    assert list((out / "tensorboard").iterdir()), "tensorboard event files expected"


def test_a_mixture_logs_each_term_and_policy_only_losses_train_and_evaluate_alone(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "rpo"
    mixture = ["dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1, 0.5]"]
    train(
        tiny_config(tiny_model_dir, out, "train.max_steps=2", "train.log_every=1", "train.micro_batch_size=8", *mixture)
    )
    rows = read_metrics(out)
    for row in [r for r in rows if r["kind"] == "train"]:
        assert row["loss"] == pytest.approx(row["loss/sigmoid"] + 0.5 * row["loss/sft"], rel=1e-6)
    before, after = [r for r in rows if r["kind"] == "eval"]
    assert before["eval/loss/sigmoid"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
    assert after["eval/loss/sft"] < before["eval/loss/sft"]  # the SFT term raised the chosen likelihood
    assert "no reference forward runs" not in capsys.readouterr().err
    for loss in ("simpo", "orpo"):
        run = ["train.max_steps=4", "train.micro_batch_size=8", f"dpo.loss={loss}", "dpo.beta=2.5"]
        results = train(tiny_config(tiny_model_dir, tmp_path / loss, *run))
        assert f"no reference forward runs (dpo.loss {loss} reads the policy alone)" in capsys.readouterr().err
        assert results["after"]["eval/loss"] < results["before"]["eval/loss"], loss


def test_eval_shard_covers_every_pair_once_with_equal_lengths():
    data = list(range(10))
    shards = [EvalShard([{"i": i} for i in data], rank, 4) for rank in range(4)]
    assert len({len(s) for s in shards}) == 1
    seen = [item["i"] for s in shards for item in s if item["weight"] == 1.0]
    assert sorted(seen) == data


def test_too_little_data_for_one_global_batch_is_a_user_error(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run", "train.micro_batch_size=400")
    with pytest.raises(UserError, match="fewer than one global batch"):
        train(config)


def test_length_grouped_batches_train(tiny_model_dir, tmp_path):
    out = tmp_path / "grouped"
    train(tiny_config(tiny_model_dir, out, "train.max_steps=2", "train.log_every=1", "data.eval=null",
                      "data.group_by_length=true", "train.micro_batch_size=4"))  # fmt: skip
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_checkpointing_some_layers_or_auto_trains_the_adapter_bit_for_bit(tiny_model_dir, tmp_path, capsys):
    adapters = {}
    for name, overrides in {
        "none": ["model.gradient_checkpointing=false"],
        "first": ["model.gradient_checkpointing=true", "model.checkpoint_layers=1"],
        "auto": ["model.gradient_checkpointing=true", "model.checkpoint_layers=auto"],
    }.items():
        out = tmp_path / name
        train(tiny_config(tiny_model_dir, out, "train.max_steps=2", "data.eval=null", *overrides))
        adapters[name] = load_file(out / ADAPTER_DIR / "adapter_model.safetensors")
        if name == "auto":  # a CPU rank: every layer, said in the run's first lines and kept in its config
            assert "model.checkpoint_layers=auto -> all (auto sizes to GPU memory" in capsys.readouterr().err
            assert "checkpoint_layers: all" in (out / "config.yaml").read_text()
    for name in ("first", "auto"):
        assert adapters[name].keys() == adapters["none"].keys()
        for key, tensor in adapters[name].items():
            assert torch.equal(tensor, adapters["none"][key]), (name, key)


def test_deepspeed_gets_a_reduce_bucket_of_the_adapters_size(tiny_model_dir, tmp_path, monkeypatch):
    """DeepSpeed allocates its reduce bucket at full size (the shipped 50M elements: 200 MB of float32);
    the engine is built with one of the adapter's size, as `dpo-lora plan` counts it."""
    import deepspeed

    real, seen = deepspeed.initialize, {}

    def initialize(*, model, config, **kwargs):
        seen["bucket"] = config["zero_optimization"]["reduce_bucket_size"]
        seen["adapter"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        engine = real(model=model, config=config, **kwargs)  # (engine, optimizer, loader, scheduler)
        seen["allocated"] = engine[0].optimizer.reduce_bucket_size
        return engine

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    train(
        tiny_config(tiny_model_dir, tmp_path / "run", "train.max_steps=1", "data.eval=null", "train.self_check=false")
    )
    assert seen["bucket"] == seen["adapter"] == seen["allocated"] < 50_000_000


def quantized_weights_on_the_graph(output: torch.Tensor) -> int:
    """bitsandbytes matmul nodes reachable from `output` that keep the weight they read on the node
    (`ctx.tensors`: checkpointing cannot drop it, and under ZeRO-3 it is the gathered weight)."""
    seen, stack, count = set(), [output.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kept = getattr(node, "tensors", ())
        count += any(isinstance(t, torch.Tensor) and t.numel() > 0 for t in kept)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


@pytest.mark.parametrize("case", ["shipped", "prefetch", "non-reentrant"])
def test_zero3_holds_no_layer_gathered_between_the_forward_and_its_recompute(
    tiny_model_dir, tmp_path, monkeypatch, case
):
    """After the policy forward under the shipped ZeRO-3 config a rank holds none of the decoder
    layers' weights gathered, neither as DeepSpeed's parameters nor on the autograd graph: each is
    gathered again for its recompute. Two ways it held them all (each rank then held the whole base):
    - a prefetch bucket: with the reference precomputed (a step is policy forward, recompute,
      backward), DeepSpeed's traced prefetcher keeps every layer gathered from the second step on;
    - non-reentrant checkpointing: its forward records each 4-bit matmul, and bitsandbytes keeps the
      (gathered) weight on the node until the backward.
    The reuse distance is 0 here: the whole tiny model is within the shipped 50M elements."""
    import dpo_lora.model.grad_checkpointing as grad_checkpointing
    import dpo_lora.train.step as step

    zero3 = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    zero3["zero_optimization"] |= {
        "stage3_param_persistence_threshold": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 50_000_000 if case == "prefetch" else 0,
    }
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    pairs = tmp_path / "pairs.jsonl"  # three steps of four pairs, scored once up front
    pairs.write_text("".join(SENTIMENT_TRAIN.read_text().splitlines(keepends=True)[:12]))
    real, gathered, on_graph, models = step.concatenated_logps, [], [], []

    def policy_forward(model, batch, *args, **kwargs):
        out = real(model, batch, *args, **kwargs)
        if torch.is_grad_enabled():  # the policy's pass, not the reference's
            held = {
                name
                for name, p in model.named_parameters()
                if ".layers." in name and "lora_" not in name and hasattr(p, "ds_id") and p.data.numel() > 0
            }
            gathered.append(held)
            on_graph.append(quantized_weights_on_the_graph(out[0]))
            models.append(model)
        return out

    monkeypatch.setattr(step, "concatenated_logps", policy_forward)
    if case == "non-reentrant":
        options = grad_checkpointing.checkpoint_options
        monkeypatch.setattr(grad_checkpointing, "checkpoint_options", lambda *a: options(*a) | {"use_reentrant": False})
    train(
        tiny_config(
            tiny_model_dir,
            tmp_path / "run",
            "train.max_steps=3",
            "data.eval=null",
            "train.self_check=false",
            "model.gradient_checkpointing=true",
            f"deepspeed={tmp_path / 'zero3.json'}",
            "dpo.reference=precompute",
            f"data.train={pairs}",
            "train.micro_batch_size=4",
            "train.grad_accum=1",
        )
    )
    layer_weights = {name for name, p in models[0].named_parameters() if ".layers." in name and "lora_" not in name}
    assert len(layer_weights) == 32  # 2 layers x (7 4-bit weights, their 7 absmax, 2 norms), none persistent
    assert gathered == ([set()] * 3 if case != "prefetch" else [set(), layer_weights, layer_weights])
    assert on_graph == ([14] * 3 if case == "non-reentrant" else [0] * 3)  # 2 layers x 7 4-bit matmuls
