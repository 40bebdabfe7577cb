"""`dpo-lora eval` on a tiny trained run: the documented JSON, consistent with training."""

from __future__ import annotations

import json

import pytest

from dpo_lora.commands.eval import evaluate_run
from dpo_lora.train.loop import train

from ..conftest import SENTIMENT_EVAL
from ..train.test_loop import tiny_config

KEYS = {
    "data", "pairs", "reward_accuracy", "mean_margin", "loss", "policy_logps_chosen", "policy_logps_rejected",
    "reference_logps_chosen", "reference_logps_rejected", "mean_chosen_logratio",
}  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    results = train(tiny_config(tiny_model_dir, out, "train.max_steps=8", "train.micro_batch_size=8"))
    return out, results


def test_eval_reproduces_the_trainers_final_eval_and_writes_json(trained_run):
    out, results = trained_run
    report = evaluate_run(str(out), batch_size=16)
    assert set(report) == KEYS and report["pairs"] == 64
    assert json.loads((out / "eval.json").read_text()) == report
    after = results["after"]
    assert report["reward_accuracy"] == pytest.approx(after["eval/rewards/accuracies"])
    assert report["mean_margin"] == pytest.approx(after["eval/rewards/margins"], rel=1e-4)
    assert report["policy_logps_chosen"] == pytest.approx(after["eval/logps/chosen"], rel=1e-5)
    # The reference is the untouched base: its log-probs are the policy's before training.
    assert report["reference_logps_chosen"] == pytest.approx(results["before"]["eval/logps/chosen"], rel=1e-5)
    expected_ratio = report["policy_logps_chosen"] - report["reference_logps_chosen"]
    assert report["mean_chosen_logratio"] == pytest.approx(expected_ratio, rel=1e-6)


def test_eval_on_other_data_and_a_checkpoint(trained_run, tmp_path):
    out, _ = trained_run
    data = tmp_path / "few.jsonl"
    data.write_text("".join(SENTIMENT_EVAL.read_text().splitlines(keepends=True)[:5]))
    report = evaluate_run(str(out / "checkpoints" / "step-00000008"), data=str(data), out=str(tmp_path / "r.json"))
    assert report["pairs"] == 5 and (tmp_path / "r.json").is_file()


def test_eval_reads_the_reference_scores_training_cached(trained_run, tmp_path, monkeypatch):
    """The run's evals scored the eval set's reference once; `dpo-lora eval` reads that, and equals
    an eval that scores the reference itself (fresh cache)."""
    import dpo_lora.train.reference as reference_module

    out, _ = trained_run
    real = reference_module.compute_reference_logps

    def refuse(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed despite the cache")

    monkeypatch.setattr(reference_module, "compute_reference_logps", refuse)
    cached = evaluate_run(str(out), out=str(tmp_path / "cached.json"))
    monkeypatch.setattr(reference_module, "compute_reference_logps", real)
    monkeypatch.setenv("DPO_LORA_CACHE", str(tmp_path / "fresh-cache"))
    fresh = evaluate_run(str(out), out=str(tmp_path / "fresh.json"))
    assert list((tmp_path / "fresh-cache" / "reference").glob("*.safetensors")), "the fresh eval cached its scores"
    for key, value in fresh.items():
        assert cached[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-6)), key
