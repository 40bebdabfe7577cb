"""Each preference method beyond DPO's sigmoid trains from the CLI on the real SmolLM2 (NF4, ZeRO-2,
the CPU): RPO's mixture, SimPO, ORPO, DPO-Positive, and KTO on the pairs split into labelled rows,
two steps each."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ..conftest import REPO, SENTIMENT_TRAIN
from .test_integration_smollm2 import MODEL_DIR

pytestmark = pytest.mark.slow
METHODS = {
    "rpo": ["dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1.0, 0.5]"],
    "simpo": ["dpo.loss=simpo", "dpo.beta=2.5", "dpo.simpo_gamma=1.2"],
    "orpo": ["dpo.loss=orpo"],
    "dpop": ["dpo.loss=dpop"],
    "kto": ["dpo.loss=kto", "dpo.kto_undesirable_weight=1.2"],
}
POLICY_ONLY = ("simpo", "orpo")


def unpaired(path):
    """The bundled pairs as KTO's unpaired rows: each chosen completion desirable, each rejected one not,
    interleaved so every micro-batch holds both."""
    pairs = [json.loads(line) for line in SENTIMENT_TRAIN.read_text().splitlines()[:32]]
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_two_steps_from_the_cli(method, tmp_path):
    from dpo_lora.commands.fetch import fetch_default_model

    out = tmp_path / "run"
    command = [sys.executable, "-m", "dpo_lora", "train", "configs/demo.yaml", f"output_dir={out}"]
    data = unpaired(tmp_path / "kto.jsonl") if method == "kto" else SENTIMENT_TRAIN
    command += [f"model.path={fetch_default_model(MODEL_DIR)}", f"data.train={data}", "data.eval=null"]
    command += [
        "data.max_length=96",
        "data.max_prompt_length=72",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "train.log_every=1",
    ]
    result = subprocess.run(command + METHODS[method], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    assert [row["step"] for row in train] == [1, 2]
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in train), train
    if method == "rpo":  # each term logged, and the total is their weighted sum
        for row in train:
            assert row["loss"] == pytest.approx(row["loss/sigmoid"] + 0.5 * row["loss/sft"], rel=1e-5)
    if method == "kto":  # at step 1 the policy is the reference: r = z0 = 0, so each row's loss is w_y (1 - 1/2)
        possible = [(k * 1.0 + (4 - k) * 1.2) / 2 / 4 for k in range(5)]  # k desirable rows of the 4
        assert min(abs(train[0]["loss"] - p) for p in possible) < 1e-5, train[0]["loss"]
    said = "dpo-lora: no reference forward runs (dpo.loss"
    assert (said in result.stderr) == (method in POLICY_ONLY), result.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
