"""Every ZeRO stage, on one rank or two, trains the same adapter.

Same seed, data and global batch (4 pairs), on a 4-bit NF4 base: in bfloat16, ZeRO-0/1/2/3 and
the offloaded ZeRO-3 on one rank, ZeRO-2 and ZeRO-3 on two ranks through DeepSpeed's own launcher
(and DoRA: ZeRO-2 on one rank, ZeRO-3 on two);
in float32, ZeRO-0 against ZeRO-2. In bfloat16 the base computes in bf16 while the adapter, its
gradients and their reduction stay in float32 at every stage (DeepSpeed's bf16 mode, which rounded
them differently per stage, is off): every stage lands within bf16 forward rounding of the float32
run. (Before, ZeRO-0 accumulated bf16 gradients and moved the loss by 1.6e-2 after three steps.)
Every step clips, and ZeRO-0/1/2 on one rank train the same adapter bit for bit.
ZeRO-3 runs with a persistence threshold of 0 so that every parameter, the packed 4-bit weights
included, is really partitioned (the tiny model's tensors are all below the shipped 1e5).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from dpo_lora.core.config import dump_yaml
from dpo_lora.core.rundir import CHECKPOINTS, step_name
from dpo_lora.train.loop import ADAPTER_DIR

from ..conftest import REPO, VENV_BIN, free_port, venv_env
from .test_checkpoints import train_rows
from .test_loop import tiny_config

# Below the tiny model's gradient norms (seen: 0.42-0.54), so that every step clips: the stages must
# also clip alike.
MAX_GRAD_NORM = 0.02
COMMON = [
    "model.quantization=nf4", "model.gradient_checkpointing=true",
    "lora.dropout=0.0", "data.eval=null", "train.micro_batch_size=2", "train.max_steps=4",
    "train.log_every=1", "train.scheduler=constant", f"train.max_grad_norm={MAX_GRAD_NORM}",
    "model.float32_residual=true",  # whatever `auto` picks on this CPU; ALL_BF16 turns it off
]  # fmt: skip
ALL_BF16 = "1rank-zero2-all-bf16"  # model.float32_residual=false
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")


def deepspeed_json(tmp_path, name: str, **zero) -> str:
    config = json.loads((REPO / "deepspeed_configs" / f"{name}.json").read_text())
    config["zero_optimization"].update(zero)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def launch(
    model_dir, output_dir, nproc: int, deepspeed_config: str, dtype: str, *overrides, threads=None, env=None
) -> None:
    """`dpo-lora train` on `nproc` ranks; global batch 4 whatever the ranks. `threads`: torch's
    CPU threads (one-rank runs started side by side take one core each); `env`: more variables."""
    config_file = output_dir.parent / f"{output_dir.name}.yaml"
    config = tiny_config(
        model_dir,
        output_dir,
        *COMMON,
        f"train.grad_accum={2 // nproc}",
        f"deepspeed={deepspeed_config}",
        f"model.dtype={dtype}",
        *overrides,
    )
    config_file.write_text(dump_yaml(config))
    if nproc == 1:
        command = [sys.executable, "-m", "dpo_lora", "train", str(config_file)]
    else:
        port = free_port()  # two pytest workers may run two of these at once
        command = [
            str(VENV_BIN / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(port),
            "--module",
            "dpo_lora",
        ]
        command += ["train", str(config_file)]
    env = venv_env(**({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {}))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (output_dir.parent / f"{output_dir.name}.stderr").write_text(result.stderr)


def adapter(output_dir) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(output_dir / ADAPTER_DIR / "adapter_model.safetensors").items()}


def assert_same_training(rows: dict, expected: dict, label: str, rel: float, abs: float) -> None:
    assert sorted(rows) == sorted(expected) == [1, 2, 3, 4], label
    for step, row in rows.items():
        for name in COMPARED:
            assert row[name] == pytest.approx(expected[step][name], rel=rel, abs=abs), (label, step, name)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    zero3 = deepspeed_json(tmp, "zero3", stage3_param_persistence_threshold=0)
    zero3_offload = deepspeed_json(tmp, "zero3_offload", stage3_param_persistence_threshold=0)
    shipped = {name: str(REPO / "deepspeed_configs" / f"{name}.json") for name in ("zero0", "zero1", "zero2")}
    plans = {
        "1rank-zero0-float32": (1, shipped["zero0"], "float32"),
        "1rank-zero2-float32": (1, shipped["zero2"], "float32"),
        "1rank-zero0": (1, shipped["zero0"], "bfloat16"),
        "1rank-zero1": (1, shipped["zero1"], "bfloat16"),
        "1rank-zero2": (1, shipped["zero2"], "bfloat16"),
        "1rank-zero3": (1, zero3, "bfloat16"),
        "1rank-zero3_offload": (1, zero3_offload, "bfloat16"),
        "2rank-zero2": (2, shipped["zero2"], "bfloat16"),
        "2rank-zero3": (2, zero3, "bfloat16"),
        ALL_BF16: (1, shipped["zero2"], "bfloat16", "model.float32_residual=false"),
        "1rank-zero2-dora": (1, shipped["zero2"], "bfloat16", "lora.dora=true"),
        "2rank-zero3-dora": (2, zero3, "bfloat16", "lora.dora=true"),
    }
    # The tiny model's runs are mostly process start-up (imports, DeepSpeed's set-up), one core's
    # work: the one-rank runs go two at a time, a core each; the two-rank runs take both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        one_rank = [
            pool.submit(
                launch, tiny_model_dir, tmp / name, 1, ds_config, dtype, "train.save_every=2", *extra, threads=1
            )
            for name, (nproc, ds_config, dtype, *extra) in plans.items()
            if nproc == 1
        ]
        for started in one_rank:
            started.result()
    for name, (nproc, ds_config, dtype, *extra) in plans.items():
        if nproc == 2:
            launch(tiny_model_dir, tmp / name, nproc, ds_config, dtype, "train.save_every=2", *extra)
    return tmp, plans


def test_every_stage_and_world_size_gives_the_same_losses_and_rewards(runs):
    tmp, plans = runs
    expected, float32 = train_rows(tmp / "1rank-zero2"), train_rows(tmp / "1rank-zero2-float32")
    assert expected[1]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert expected[4]["loss"] < expected[1]["loss"] - 0.01  # and it learns: the comparison is not vacuous
    for name, (nproc, _, dtype, *_) in plans.items():
        rows = train_rows(tmp / name)
        assert rows[4]["world_size"] == nproc and rows[4]["global_batch"] == 4, name
        if dtype == "bfloat16" and name != ALL_BF16 and "dora" not in name:
            # bfloat16 rounding: reductions in a different order move the last bits (seen: <= 6e-5).
            assert_same_training(rows, expected, name, rel=5e-3, abs=1e-3)
            # Against float32 only the bf16 matmuls differ (seen: <= 1.8e-4 with the float32 residual
            # stream and every step clipped; ~1e-3 all-bf16, and ZeRO-0's bf16 gradient accumulation
            # was 1.6e-2 off before the adapter stayed in float32).
            for step in (2, 3, 4):
                assert abs(rows[step]["loss"] - float32[step]["loss"]) < 3e-4, (name, step)
    # The float32 residual stream is what brings bf16 this close: all-bf16 is not.
    all_bf16 = train_rows(tmp / ALL_BF16)
    assert max(abs(all_bf16[step]["loss"] - float32[step]["loss"]) for step in (2, 3, 4)) > 3e-4


def test_dora_under_zero3_on_two_ranks_trains_what_zero2_trains_on_one(runs, tmp_path):
    """DoRA takes the norm of each layer's whole base weight in its own forward, outside the base
    layer's: under ZeRO-3 each DoRA layer gathers it (partitions really split: persistence 0). Two
    ranks' ZeRO-3 train one rank's ZeRO-2 losses and adapter, magnitudes included, and a ZeRO-3
    checkpoint exports. Fails without the gathering (bitsandbytes reads an empty partition)."""
    from dpo_lora.commands.export import export_model

    tmp, _ = runs
    expected, lora = train_rows(tmp / "1rank-zero2-dora"), train_rows(tmp / "1rank-zero2")
    assert_same_training(train_rows(tmp / "2rank-zero3-dora"), expected, "2rank-zero3-dora", rel=5e-3, abs=1e-3)
    assert expected[1]["loss"] == pytest.approx(0.6931, abs=1e-3) and expected[4]["loss"] < expected[1]["loss"] - 0.01
    assert max(abs(expected[step]["loss"] - lora[step]["loss"]) for step in (2, 3, 4)) > 1e-4, "DoRA is not LoRA"
    zero2, zero3 = adapter(tmp / "1rank-zero2-dora"), adapter(tmp / "2rank-zero3-dora")
    assert sorted(zero3) == sorted(zero2) and sum("lora_magnitude_vector" in name for name in zero3) == 14
    for name, tensor in zero2.items():
        difference = (zero3[name] - tensor).norm() / tensor.norm()
        assert difference < 0.02 and (zero3[name] - tensor).abs().max() <= 4 * 5e-3, (name, difference)
    checkpoint = tmp / "2rank-zero3-dora" / CHECKPOINTS / step_name(4)
    report = export_model(str(checkpoint), out=str(tmp_path / "merged"), dtype="float32")
    assert report["max_logp_diff_vs_claimed"] < 1e-3


def test_zero0_and_zero1_train_zero2s_adapter_bit_for_bit(runs):
    """One rank, clipping active: ZeRO-0 clips in dpo-lora's optimizer with ZeRO-1/2's arithmetic
    (DeepSpeed's own ZeRO-0 clipping rounds differently in the last bit, which a bf16 forward
    spreads to ~0.01 of loss within a few steps on SmolLM2)."""
    tmp, _ = runs
    for dtype in ("", "-float32"):
        expected_rows, expected_adapter = train_rows(tmp / f"1rank-zero2{dtype}"), adapter(tmp / f"1rank-zero2{dtype}")
        assert all(expected_rows[step]["grad_norm"] > MAX_GRAD_NORM for step in expected_rows), "clipping is active"
        names = ["1rank-zero0-float32"] if dtype else ["1rank-zero0", "1rank-zero1"]
        for name in names:
            assert train_rows(tmp / name) == expected_rows, name  # grad_norm included: ZeRO-0 logs it too
            assert sorted(adapter(tmp / name)) == sorted(expected_adapter)
            for key, tensor in expected_adapter.items():
                assert torch.equal(adapter(tmp / name)[key], tensor), (name, key)


def test_zero3_loads_the_base_straight_into_each_ranks_partition_quietly(runs):
    tmp, plans = runs
    for name, ranks in (("1rank-zero3", 1), ("2rank-zero3", 2), ("1rank-zero3_offload", 1)):
        said = re.search(r"rank 0 holds ([0-9.]+) KiB of its ([0-9.]+) KiB", (tmp / f"{name}.stderr").read_text())
        assert said is not None, name  # the tiny model's base is a few hundred KiB
        assert float(said[1]) == pytest.approx(float(said[2]) / ranks, rel=0.02), name
    for name in ("1rank-zero2", "2rank-zero2"):  # ZeRO-2 replicates the base: loaded whole
        assert "rank 0 holds" not in (tmp / f"{name}.stderr").read_text(), name
    for name in plans:  # DeepSpeed's per-step calls of collectives torch renamed say nothing
        assert "is deprecated" not in (tmp / f"{name}.stderr").read_text(), name


def held_kib(stderr: str) -> tuple[float, float]:
    """(quantized layers, the rest) that the ZeRO-3 loader says rank 0 holds, in KiB."""
    said = re.search(r"quantized layers ([0-9.]+) (KiB|MiB), the rest ([0-9.]+) (KiB|MiB)", stderr)
    assert said is not None, stderr[-2000:]
    scale = {"KiB": 1, "MiB": 1024}
    return float(said[1]) * scale[said[2]], float(said[3]) * scale[said[4]]


def test_the_zero3_plan_counts_the_base_bytes_each_rank_holds(runs):
    """`dpo-lora plan`'s per-rank 4-bit and unquantized components against what the loader says rank
    0 holds after a real two-rank (and one-rank) ZeRO-3 load, within 2%. Every rank holds the same:
    DeepSpeed pads each tensor to a multiple of the ranks and gives each an equal slice."""
    from dpo_lora.core.config import load_config
    from dpo_lora.model.memory_plan import plan

    tmp, _ = runs
    for name, ranks in (("2rank-zero3", 2), ("1rank-zero3", 1)):
        quantized, rest = held_kib((tmp / f"{name}.stderr").read_text())
        planned = plan(load_config(str(tmp / f"{name}.yaml"), []), world_size=ranks).components
        assert planned["4-bit weights + absmax"] / 1024 == pytest.approx(quantized, rel=0.02), name
        assert planned["unquantized weights (embeddings, head, norms)"] / 1024 == pytest.approx(rest, rel=0.02), name
    two, one = held_kib((tmp / "2rank-zero3.stderr").read_text()), held_kib((tmp / "1rank-zero3.stderr").read_text())
    # Half the packed weights and absmax; the codebooks and nested absmax (not parameters) stay whole,
    # which on this tiny model is a third of its quantized bytes (on a 7B, a thousandth).
    assert one[0] / 2 < two[0] < 0.7 * one[0] and two[1] == pytest.approx(one[1] / 2, rel=0.02)


def test_zero3_saves_the_full_adapter_equal_to_zero2(runs):
    tmp, _ = runs
    zero2, zero3 = adapter(tmp / "2rank-zero2"), adapter(tmp / "2rank-zero3")
    assert sorted(zero3) == sorted(zero2) and len(zero2) > 0
    for name, tensor in zero2.items():
        assert zero3[name].shape == tensor.shape and tensor.numel() > 0, name
        # The runs differ only by rounding order; where a gradient is near 0 that can flip the
        # sign of an Adam step (lr 5e-3), so single weights may differ by a few steps, the whole
        # tensor by little. A missing or misplaced shard would differ by the weights themselves.
        difference = (zero3[name] - tensor).norm() / tensor.norm()
        assert difference < 0.02 and (zero3[name] - tensor).abs().max() <= 4 * 5e-3, (name, difference)
    assert any(t.abs().max() > 0 for n, t in zero3.items() if "lora_B" in n), "lora_B starts at 0; it must have moved"


def test_zero3_two_ranks_resume_equals_the_uninterrupted_run(runs, tiny_model_dir):
    tmp, plans = runs
    out = tmp / "2rank-zero3"
    expected_rows, expected_adapter = train_rows(out), adapter(out)
    shutil.rmtree(out / CHECKPOINTS / step_name(4))
    shutil.rmtree(out / ADAPTER_DIR)
    launch(tiny_model_dir, out, 2, plans["2rank-zero3"][1], "bfloat16", "train.save_every=2", "train.resume=auto")
    rows = train_rows(out)
    for step in (3, 4):
        assert {k: rows[step][k] for k in COMPARED} == {k: expected_rows[step][k] for k in COMPARED}, step
    for name, tensor in expected_adapter.items():
        assert torch.equal(adapter(out)[name], tensor), name


def test_a_zero3_checkpoint_exports_the_adapter_it_trained(runs, tmp_path):
    from dpo_lora.commands.export import export_model
    from dpo_lora.train.trained import adapter_state_from_checkpoint

    out = runs[0] / "2rank-zero3"
    masters = adapter_state_from_checkpoint(out / CHECKPOINTS / step_name(4))  # float32, joined from 2 shards
    final = adapter(out)  # what training saved: the adapter, float32 in a bf16 run too
    assert sorted(masters) == sorted(final)
    for name, tensor in final.items():
        torch.testing.assert_close(masters[name], tensor, rtol=0, atol=0)
    report = export_model(str(out / CHECKPOINTS / step_name(4)), out=str(tmp_path / "merged"), dtype="float32")
    assert report["max_logp_diff_vs_claimed"] < 1e-3
