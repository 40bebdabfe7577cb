"""Run set-up decisions that every rank must share."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from ..conftest import REPO
from .test_parity import launch

# Started in every process of the run (PYTHONPATH): rank RANK answers NATIVE[RANK] when asked
# whether its CPU computes bf16 natively, whatever this machine's CPU is.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os

    if "RANK" in os.environ and "DPO_LORA_TEST_NATIVE" in os.environ:
        native = os.environ["DPO_LORA_TEST_NATIVE"].split(",")[int(os.environ["RANK"])] == "yes"
        import dpo_lora.model.precision as precision

        precision.cpu_has_native_bf16 = lambda: native
    """
)


@pytest.mark.parametrize(
    ("native", "float32_residual"),
    [("yes,yes", False), ("yes,no", True), ("no,yes", True)],
    ids=["both-native", "rank1-emulates", "rank0-emulates"],
)
def test_ranks_resolve_float32_residual_auto_once_for_the_run(tiny_model_dir, tmp_path, native, float32_residual):
    """`model.float32_residual: auto` is all bf16 only where every rank computes bf16 natively: two
    real ranks whose CPUs disagree both keep the float32 residual, whichever rank emulates, and
    the run's config.yaml records the choice (a resume elsewhere is held to it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "run"
    launch(
        tiny_model_dir, out, 2, str(REPO / "deepspeed_configs" / "zero2.json"), "bfloat16",
        "train.max_steps=1", "model.float32_residual=auto",
        env={"PYTHONPATH": f"{site}:{REPO}", "DPO_LORA_TEST_NATIVE": native},
    )  # fmt: skip
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["float32_residual"] is float32_residual
