"""TR-DPO's hard update (`dpo.sync_reference_every`): the reference becomes the policy every N steps.

The invariant that pins it: right after a sync the policy *is* the reference, so the next step's
loss is exactly log 2 and its rewards 0 (in float32, where both passes run the same kernels on
the same values, and the policy without dropout), while the policy still moves: DPO's gradient at
margin 0 is not 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from dpo_lora.core.errors import UserError
from dpo_lora.train.loop import ADAPTER_DIR, train

from ..conftest import REPO
from .test_checkpoints import train_rows
from .test_loop import tiny_config

RUN = ["train.micro_batch_size=2", "data.eval=null", "train.scheduler=constant"]  # no dropout: the reference has none
LOG2 = math.log(2)


def losses(out) -> dict[int, float]:
    return {step: row["loss"] for step, row in train_rows(out).items()}


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_after_each_sync_the_step_starts_from_the_policy_as_reference(tiny_model_dir, tmp_path, zero):
    """Every 2 steps: steps 1, 3, 5 start with policy == reference (loss log 2, margins 0); steps
    2 and 4 do not. Under ZeRO-3 each rank copies its partitions. The fixed reference (0) differs."""
    ds = f"deepspeed={REPO / 'deepspeed_configs' / zero}.json"
    moving, fixed = tmp_path / "moving", tmp_path / "fixed"
    train(tiny_config(tiny_model_dir, moving, *RUN, ds, "train.max_steps=5", "dpo.sync_reference_every=2"))
    train(tiny_config(tiny_model_dir, fixed, *RUN, ds, "train.max_steps=5"))
    rows, got = train_rows(moving), losses(moving)
    for step in (1, 3, 5):
        assert got[step] == pytest.approx(LOG2, abs=1e-6) and rows[step]["rewards/margins"] == pytest.approx(
            0, abs=1e-6
        )
    for step in (2, 4):
        assert abs(got[step] - LOG2) > 1e-4, step
    assert got[2] == losses(fixed)[2]  # before its first sync it is the fixed-reference run
    assert all(abs(losses(fixed)[step] - LOG2) > 1e-4 for step in (3, 4, 5))
    adapter = load_file(moving / ADAPTER_DIR / "adapter_model.safetensors")
    assert not any("reference" in name for name in adapter)  # the saved adapter is the policy alone
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name), "the policy moved"


def test_a_resume_between_syncs_restores_the_reference_of_that_step(tiny_model_dir, tmp_path):
    """Stopped at step 3 (the reference is the step-2 policy), resumed to 5: steps 4 and 5 equal the
    uninterrupted run's. A resume that rebuilt the reference from the start would differ at step 4."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    sync = ["dpo.sync_reference_every=2", "train.save_every=3", "lora.dropout=0.1"]  # RNG restored too
    train(tiny_config(tiny_model_dir, whole, *RUN, *sync, "train.max_steps=5"))
    train(tiny_config(tiny_model_dir, part, *RUN, *sync, "train.max_steps=3"))
    train(tiny_config(tiny_model_dir, part, *RUN, *sync, "train.max_steps=5", "train.resume=force"))
    expected, resumed = train_rows(whole), train_rows(part)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert resumed[step] == expected[step], step
    final = load_file(part / ADAPTER_DIR / "adapter_model.safetensors")
    for name, tensor in load_file(whole / ADAPTER_DIR / "adapter_model.safetensors").items():
        assert torch.equal(final[name], tensor), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dpo.ld_alpha=1.5"], "must be in \\[0, 1\\]"),
        (["dpo.ld_alpha=0.5", "dpo.loss=kto"], "kto's rows are not pairs"),
        (["dpo.sync_reference_every=-1"], "must be >= 0"),
        (["dpo.sync_reference_every=2", "dpo.reference=precompute"], "can't be precomputed"),
        (["dpo.sync_reference_every=2", "dpo.loss=simpo"], "reads no reference to sync"),
        (["dpo.sync_reference_every=2", "dpo.reference_free=true"], "reads no reference to sync"),
    ],
)
def test_a_reference_setting_that_cannot_work_is_refused_naming_the_key(tiny_model_dir, tmp_path, overrides, message):
    key = overrides[0].split("=")[0]
    with pytest.raises(UserError, match=f"{key}.*{message}"):
        tiny_config(tiny_model_dir, tmp_path / "run", *overrides)


def test_the_plan_counts_the_reference_adapter(tiny_model_dir, tmp_path):
    from dpo_lora.model.memory_plan import plan

    moving = plan(tiny_config(tiny_model_dir, tmp_path / "run", "dpo.sync_reference_every=4")).components
    fixed = plan(tiny_config(tiny_model_dir, tmp_path / "run")).components
    assert moving["reference adapter (dpo.sync_reference_every)"] == fixed["LoRA parameters"] > 0
    assert "reference adapter (dpo.sync_reference_every)" not in fixed
