"""Precomputed reference log-probs train exactly like the online reference, and are cached."""

from __future__ import annotations

import json
import socket

import pytest
import torch

import dpo_lora.train.reference as reference_module
from dpo_lora.core.errors import UserError
from dpo_lora.train.loop import train

from ..conftest import SENTIMENT_TRAIN
from .test_loop import read_metrics, tiny_config, train_rows

RUN = ["train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum=2", "data.eval=null", "train.log_every=1"]


def test_precomputed_reference_trains_like_the_online_one_and_is_reused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LORA_CACHE", str(tmp_path / "cache"))
    online = tmp_path / "online"
    train(tiny_config(tiny_model_dir, online, *RUN, "dpo.reference=online"))
    first = tmp_path / "precompute"
    train(tiny_config(tiny_model_dir, first, *RUN, "dpo.reference=precompute"))
    cached = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(cached) == 1

    expected = train_rows(online)
    assert expected[-1]["loss"] < expected[0]["loss"] - 0.01  # the runs learn: the comparison is not vacuous
    for row, want in zip(train_rows(first), expected, strict=True):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
            # Same pairs, padded to a different width in the reference pass: float rounding only.
            assert row[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (row["step"], name)

    # A rerun reads the cache: no reference forward at all.
    def no_forward(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed despite the cache")

    monkeypatch.setattr(reference_module, "compute_reference_logps", no_forward)
    again = tmp_path / "again"
    train(tiny_config(tiny_model_dir, again, *RUN, "dpo.reference=precompute"))
    assert [r["loss"] for r in train_rows(again)] == [r["loss"] for r in train_rows(first)]


def test_an_init_adapter_reference_with_dropout_trains_the_same_online_and_precomputed(tiny_model_dir, tmp_path):
    """The reference is the init adapter, whose LoRA dropout must not apply to reference forwards:
    online (during training) and precomputed (before it) then give the same reference log-probs."""
    start = tmp_path / "start"
    train(tiny_config(tiny_model_dir, start, *RUN, "train.max_steps=2"))
    rows = {}
    for mode in ("online", "precompute"):
        out = tmp_path / mode
        train(tiny_config(tiny_model_dir, out, *RUN, f"dpo.reference={mode}", "lora.dropout=0.2",
                          f"lora.init_adapter={start / 'adapter'}"))  # fmt: skip
        rows[mode] = train_rows(out)
    for row, want in zip(rows["precompute"], rows["online"], strict=True):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert row[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (row["step"], name)


def test_the_fingerprint_follows_what_the_reference_depends_on(tiny_model_dir, tmp_path):
    from dpo_lora.data.prepare import prepare_splits
    from dpo_lora.model.load import load_tokenizer

    def fingerprint(*overrides):
        config = tiny_config(tiny_model_dir, tmp_path / "x", *overrides)
        train_set, _ = prepare_splits(config.data, load_tokenizer(config.model), config.train.seed)
        return reference_module.reference_fingerprint(config.model, config.lora, train_set, config.dpo.ld_alpha)

    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint("model.quantization=none") != base
    assert fingerprint("data.max_length=80") != base  # truncation changes the tokenized data
    assert fingerprint("train.lr=1e-3") == base  # the optimizer does not touch the reference
    assert fingerprint("dpo.ld_alpha=0.5") != base  # LD-DPO weighs the reference's scores too


def _cache_worker(rank: int, port: int, cache_dirs: list[str], report_dir: str) -> None:
    """One rank of a 2-rank gloo world whose caches are node-local: each rank has its own folder."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    computed = []

    def compute():
        computed.append(rank)
        dist.barrier()  # a collective inside, as in the real reference pass: a lone rank would hang here
        return torch.full((3, 2), 7.0)

    from pathlib import Path

    logps = reference_module.cached_or_computed(Path(cache_dirs[rank]) / "ref.safetensors", compute, rank == 0)
    report = {"computed": bool(computed), "logps": logps.tolist()}
    (Path(report_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.parametrize("cached_on", ["rank 0", "rank 1", "none"])
def test_rank_0_decides_whether_the_reference_cache_is_used(tmp_path, cached_on):
    """With node-local caches the ranks must agree: rank 0's cache serves everyone, and a cache only
    another rank has is ignored (all compute), so no rank waits in a collective the others skip."""
    from safetensors.torch import save_file

    dirs = [tmp_path / "node0", tmp_path / "node1"]
    for folder in dirs:
        folder.mkdir()
    holder = {"rank 0": 0, "rank 1": 1}.get(cached_on)
    if holder is not None:
        save_file({"logps": torch.full((3, 2), -1.5)}, str(dirs[holder] / "ref.safetensors"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_cache_worker, args=(port, [str(d) for d in dirs], str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected_value = -1.5 if cached_on == "rank 0" else 7.0
    for report in reports:
        assert report["computed"] == (cached_on != "rank 0")
        assert report["logps"] == [[expected_value] * 2] * 3
    assert (dirs[0] / "ref.safetensors").is_file()  # rank 0 caches what it computed


def test_eval_reference_scores_are_computed_once_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    """Every eval of a run, and every run on the same eval set, reads one cached reference scoring."""
    monkeypatch.setenv("DPO_LORA_CACHE", str(tmp_path / "cache"))
    run = ["train.max_steps=2", "train.micro_batch_size=2", "train.eval_every=1", "train.log_every=1"]
    first = tmp_path / "first"
    train(tiny_config(tiny_model_dir, first, *run))
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("eval reference log-probs recomputed despite the cache")

    monkeypatch.setattr(reference_module, "compute_reference_logps", no_forward)
    again = tmp_path / "again"
    train(tiny_config(tiny_model_dir, again, *run))
    evals = [[row for row in read_metrics(out) if "eval/loss" in row] for out in (first, again)]
    assert len(evals[0]) == 3 and evals[0] == evals[1]  # before, step 1, step 2
    assert evals[0][-1]["eval/loss"] != evals[0][0]["eval/loss"]  # the policy moved: evals are not all the same


@pytest.mark.parametrize("training", [True, False])
def test_scoring_the_reference_leaves_the_model_in_its_mode(tiny_model_dir, tmp_path, training):
    """`dpo-lora eval` scores the policy right after the reference: a model left in train mode would
    apply LoRA dropout to the policy's eval scores."""
    from dpo_lora.data.layout import batch_layout
    from dpo_lora.data.prepare import prepare_splits
    from dpo_lora.model.load import attach_adapter, load_base, load_tokenizer

    config = tiny_config(tiny_model_dir, tmp_path / "run", "lora.dropout=0.3")
    model = attach_adapter(load_base(config.model, torch.device("cpu")), config.lora).train(training)
    tokenizer = load_tokenizer(config.model)
    _, eval_set = prepare_splits(config.data, tokenizer, config.train.seed)
    collate, _ = batch_layout(config, model, tokenizer.pad_token_id)
    reference_module.compute_reference_logps(model, eval_set, collate, 8, 0, 1, torch.device("cpu"))
    assert model.training == training
    assert all(module.training == training for module in model.modules())


@pytest.mark.parametrize(
    ("run", "chosen"),
    [
        (["train.max_steps=0", "train.epochs=1"], "precompute"),  # a full epoch: each pair scored once
        (["train.max_steps=2"], "online"),  # 8 of the pairs: scoring them online costs less
    ],
)
def test_auto_reference_precomputes_from_one_epoch_on_and_trains_like_online(
    tiny_model_dir, tmp_path, monkeypatch, capsys, run, chosen
):
    monkeypatch.setenv("DPO_LORA_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    from ..conftest import SENTIMENT_TRAIN

    pairs.write_text("".join(SENTIMENT_TRAIN.read_text().splitlines(keepends=True)[:16]))
    common = ["train.micro_batch_size=2", "train.grad_accum=2", "data.eval=null", f"data.train={pairs}", *run]
    train(tiny_config(tiny_model_dir, tmp_path / "online", *common, "dpo.reference=online"))
    capsys.readouterr()
    train(tiny_config(tiny_model_dir, tmp_path / "auto", *common))  # auto is the default
    said = capsys.readouterr().err
    assert f"dpo-lora: reference {chosen} (the run covers" in said
    assert (chosen == "precompute") == ("16 pairs in" in said and "up front" in said)
    assert bool(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == (chosen == "precompute")

    expected, got = train_rows(tmp_path / "online"), train_rows(tmp_path / "auto")
    assert len(got) == (4 if chosen == "precompute" else 2)
    for row, want in zip(got, expected, strict=True):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert row[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (row["step"], name)


def test_kto_on_unpaired_rows_trains_alike_with_the_reference_online_and_precomputed(tiny_model_dir, tmp_path):
    """The unpaired rows' completions and their mismatched ones are scored once and cached like a
    pair's: the precomputed run's rows are the online run's."""
    pairs = [json.loads(line) for line in SENTIMENT_TRAIN.read_text().splitlines()[:24]]
    rows = [
        {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
        for p in pairs
        for key in ("chosen", "rejected")
    ]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kto = ["dpo.loss=kto", f"data.train={data}", "data.eval=null", "train.max_steps=6", "train.micro_batch_size=8"]
    online, precomputed = tmp_path / "online", tmp_path / "precompute"
    train(tiny_config(tiny_model_dir, online, *kto, "dpo.reference=online"))
    train(tiny_config(tiny_model_dir, precomputed, *kto, "dpo.reference=precompute"))
    expected = train_rows(online)
    assert expected[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # r = z0 = 0 at step 1: each row's loss is 1/2
    assert expected[-1]["loss"] < expected[0]["loss"] - 0.01
    for row, want in zip(train_rows(precomputed), expected, strict=True):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert row[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (row["step"], name)
    with pytest.raises(UserError, match="data.train holds unpaired rows .* they train dpo.loss kto"):
        train(tiny_config(tiny_model_dir, tmp_path / "pairs-loss", f"data.train={data}", "data.eval=null"))
    with pytest.raises(UserError, match="dpo.loss kto trains on unpaired rows .* data.train holds pairs"):
        train(tiny_config(tiny_model_dir, tmp_path / "kto-on-pairs", "dpo.loss=kto", "data.eval=null"))
