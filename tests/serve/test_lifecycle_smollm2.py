"""The whole life of a DPO job on the real SmolLM2-135M-Instruct (CPU rank), through the `openai`
client, on a server whose devices have 2 GiB: upload, quote, create, estimated_finish while it
runs, metrics events, the health warning at lr 1e-3, checkpoints with the best one marked,
success, result file, the adapter downloaded and loaded with PEFT, the event stream, a merged
export (GGUF) downloaded as a tar, chat completions with the result (the README's example), and a
second round continuing from the fine-tuned model."""

from __future__ import annotations

import csv
import io
import json
import runpy
import tarfile
import time
import urllib.request

import openai
import pytest
import torch
from safetensors.torch import load_file

from ..conftest import REPO
from .conftest import MODEL_DIR, all_events, openai_rows, wait_for_status, write_jsonl

pytestmark = pytest.mark.slow


def test_a_dpo_job_on_smollm2_from_upload_to_a_peft_adapter_and_an_export(servers, smollm2_models, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text())
    server = servers(smollm2_models, config, "--device-memory", "2GiB")  # admission plans against 2 GiB
    client = server.client()
    train = write_jsonl(tmp_path / "train.jsonl", openai_rows(REPO / "data" / "sentiment" / "train.jsonl", 32))
    held_out = write_jsonl(tmp_path / "eval.jsonl", openai_rows(REPO / "data" / "sentiment" / "eval.jsonl", 4))
    train_file = client.files.create(file=train.open("rb"), purpose="fine-tune")
    eval_file = client.files.create(file=held_out.open("rb"), purpose="fine-tune")
    assert (train_file.status, eval_file.status) == ("processed", "processed")

    request = dict(
        model="SmolLM2-135M-Instruct",
        training_file=train_file.id,
        validation_file=eval_file.id,
        suffix="sentiment",
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 4, "learning_rate_multiplier": 10 / 7}},
        },
    )
    extra = {
        "dpo_lora": {
            "lora": {"r": 8},
            "model.gradient_checkpointing": True,  # 1.5 GiB planned; 2.9 without
            "data.max_length": 96,
            "data.max_prompt_length": 72,
            "train": {"max_steps": 8, "save_every": 4, "log_every": 1, "eval_batch_size": 4},
        }
    }
    quote = client.post("/fine_tuning/quotes", cast_to=object, body={**request, **extra})  # the same body as a create
    assert quote["fits"] is True and quote["per_rank_bytes"] <= quote["device_bytes"] == 2 * 2**30
    assert quote["estimated_seconds"] > 0 and quote["efficiency_from"] == "this device type's default"
    job = client.fine_tuning.jobs.create(**request, extra_body=extra)
    seen = []
    job = wait_for_status(client, job.id, ("succeeded",), timeout=600, seen=seen)
    # While it ran, the job said when it would finish, from its measured step times.
    finishes = [j.estimated_finish for j in seen if j.status == "running" and j.estimated_finish is not None]
    assert finishes and all(job.created_at <= f <= job.created_at + 3600 for f in finishes)
    assert job.estimated_finish is None  # finished
    # The quote counted the tokens the run then trained on (all 32 pairs once), from the tokenized data.
    assert quote["total_steps"] == 8 and quote["trained_tokens"] == job.trained_tokens
    assert job.fine_tuned_model.startswith("ft:SmolLM2-135M-Instruct:dpo-lora:sentiment:")
    assert job.fine_tuned_model in [model.id for model in client.models.list()]

    events = all_events(client, job.id)
    metrics = [e.data for e in events if e.type == "metrics" and "loss" in e.data]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for row in metrics:
        assert {"loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "pairs_per_s"} <= set(
            row
        )
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its reference
    assert metrics[0]["global_batch"] == 4 and metrics[0]["lr"] == pytest.approx(1e-3)  # 10/7 x demo's 7e-4
    # At lr 1e-3 both completions' log-probs fall, the chosen ones below the reference's, while the
    # margin grows: the trainer's health monitor warns, and the warning is a `warn` event.
    warnings = [e.message for e in events if e.level == "warn"]
    assert any(m.startswith("likelihood displacement at step") and "log-probs fell" in m for m in warnings), warnings
    assert job.trained_tokens == sum(m["tokens"] for m in metrics) > 0
    assert any(e.type == "metrics" and "eval/loss" in e.data for e in events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 4]
    assert checkpoints[0].metrics.train_loss == pytest.approx(metrics[-1]["loss"])
    assert checkpoints[0].metrics.valid_loss is not None
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-8"
    # The one eval after step 0 is step 8's: the best checkpoint by held-out reward accuracy.
    assert [getattr(c.metrics, "best", None) for c in checkpoints] == [True, False]
    assert job.metadata == {"dpo_lora_best_checkpoint": checkpoints[0].fine_tuned_model_checkpoint}

    (result_id,) = job.result_files
    table = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert [float(r["loss"]) for r in table if r["loss"]] == pytest.approx([m["loss"] for m in metrics])

    archive = client.get(f"/fine_tuning/jobs/{job.id}/checkpoints/{checkpoints[0].id}/adapter", cast_to=bytes)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path / "download", filter="data")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, tmp_path / "download" / "adapter")
    trained = load_file(server.state_dir / "jobs" / job.id / "run" / "adapter" / "adapter_model.safetensors")
    loaded = {name: p for name, p in policy.named_parameters() if "lora_" in name}
    assert len(loaded) == len(trained) > 0
    for name, tensor in trained.items():
        assert torch.equal(loaded[name.replace(".weight", ".default.weight")], tensor)

    stream_request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/fine_tuning/jobs/{job.id}/events/stream",
                                     headers={"Authorization": f"Bearer {server.api_key}"})  # fmt: skip
    with urllib.request.urlopen(stream_request, timeout=60) as stream:  # server-sent events; ends with the job
        lines = [line.decode().rstrip("\n") for line in stream]
    streamed = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [e["id"] for e in streamed[:-1]] == [e.id for e in events]
    assert "event: end" in lines and streamed[-1] == {"status": "succeeded"}

    export = client.post(f"/fine_tuning/jobs/{job.id}/export", cast_to=object, body={"format": "gguf"})
    deadline = time.monotonic() + 300
    while export["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(1)
        export = client.get(f"/fine_tuning/jobs/{job.id}/exports/{export['id']}", cast_to=object)
    assert export["status"] == "succeeded", export
    assert "path" not in export  # where it lies on the server is not the client's business
    content = client.get(export["content_url"].removeprefix("/v1"), cast_to=bytes)  # the openai client's way
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        tar.extractall(tmp_path / "export", filter="data")
    folder = tmp_path / "export" / export["id"]
    (gguf_file,) = folder.glob("*.gguf")  # with its Modelfile and report
    assert export["format"] == "gguf" and (folder / "Modelfile").is_file()
    merged = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file.name, dtype=torch.float32)
    assert type(merged) is type(base) and merged.config.num_hidden_layers == base.config.num_hidden_layers

    # Chat with it, as the README's example does: streamed, beside the base; DPO changed the answer.
    example = runpy.run_path(str(REPO / "examples" / "train_and_chat.py"))
    tuned, plain = (example["chat"](client, model) for model in (job.fine_tuned_model, "SmolLM2-135M-Instruct"))
    assert tuned["text"] and plain["text"] and tuned["text"] != plain["text"]
    assert 0 < tuned["first_token_s"] < 60 and tuned["tokens_per_s"] > 0 and 0 < tuned["tokens"] <= 48
    checkpoint = client.chat.completions.create(model=checkpoints[1].fine_tuned_model_checkpoint, max_tokens=8,
                                                messages=[{"role": "user", "content": "Hi"}], temperature=0)  # fmt: skip
    assert checkpoint.choices[0].message.content and checkpoint.usage.completion_tokens <= 8

    # A second preference round on top of the first: the fine-tuned model as the job's base, its
    # adapter both where the policy starts and the reference (copied into the new job's folder).
    second = client.fine_tuning.jobs.create(
        model=job.fine_tuned_model, training_file=train_file.id, validation_file=eval_file.id,
        method=request["method"],
        extra_body={"dpo_lora": {**extra["dpo_lora"], "train": {"max_steps": 2, "log_every": 1, "save_every": 0}}},
    )  # fmt: skip
    assert second.model == job.fine_tuned_model  # the job object names its parent, as OpenAI's does
    second = wait_for_status(client, second.id, ("succeeded",), timeout=600)
    assert second.fine_tuned_model.startswith("ft:SmolLM2-135M-Instruct:dpo-lora:")  # named by the root base
    assert second.fine_tuned_model != job.fine_tuned_model
    second_events = all_events(client, second.id)
    rows = [e.data for e in second_events if e.type == "metrics" and "loss" in e.data]
    before = next(e.data for e in second_events if e.type == "metrics" and "eval/loss" in e.data)
    # Before any step (eval mode, no dropout) the policy is its reference, the parent: ln 2 exactly.
    assert before["eval/loss"] == pytest.approx(0.6931, abs=1e-4) and before["eval/rewards/margins"] == 0
    assert abs(rows[0]["logps/chosen"] - metrics[0]["logps/chosen"]) > 1e-2  # the same first pairs, not the base
    folder = server.state_dir / "jobs" / second.id
    copied = load_file(folder / "init_adapter" / "adapter_model.safetensors")
    assert copied.keys() == trained.keys() and all(torch.equal(copied[k], trained[k]) for k in trained)
    after = load_file(folder / "run" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(after[k], trained[k]) for k in trained)  # trained on top
    assert example["chat"](client, second.fine_tuned_model)["text"]  # served as base + its own adapter
    with pytest.raises(openai.BadRequestError) as unknown:
        client.fine_tuning.jobs.create(model=job.fine_tuned_model + "x", training_file=train_file.id)
    assert unknown.value.body["param"] == "model" and "is not one this server knows" in unknown.value.body["message"]
    # A checkpoint can be the base too (quoted here: the same resolution as a create).
    quoted = client.post("/fine_tuning/quotes", cast_to=object,
                         body={**request, **extra, "model": checkpoints[1].fine_tuned_model_checkpoint})  # fmt: skip
    assert quoted["fits"] is True
