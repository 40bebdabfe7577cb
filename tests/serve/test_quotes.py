"""Quotes and admission against a server whose devices have 2 GiB (`--device-memory 2GiB`), on the
real SmolLM2-135M-Instruct, through the `openai` client and raw HTTP: a small job fits and is
priced; a micro-batch of 64 x 8,192 tokens without checkpointing does not, and its create is
refused with the plan's recommendation unless forced."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from ..conftest import REPO
from .conftest import openai_rows, write_jsonl

pytestmark = pytest.mark.slow
SMALL = {"model.gradient_checkpointing": True, "lora": {"r": 8}, "data.max_length": 96, "data.max_prompt_length": 72,
         "train": {"max_steps": 8}}  # fmt: skip
HUGE = {"model.gradient_checkpointing": False, "data.max_length": 8192, "data.max_prompt_length": 4096}


@pytest.fixture
def server(servers, smollm2_models, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text())
    return servers(smollm2_models, config, "--device-memory", "2GiB")


@pytest.fixture
def training_file(server, tmp_path):
    rows = openai_rows(REPO / "data" / "sentiment" / "train.jsonl", 32)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    return server.client().files.create(file=path.open("rb"), purpose="fine-tune").id


def body(training_file: str, batch_size: int, extra: dict) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct",
        "training_file": training_file,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": batch_size}}},
        "dpo_lora": extra,
    }


def test_a_small_job_is_quoted_as_fitting_with_its_tokens_and_time(server, training_file):
    quote = server.client().post("/fine_tuning/quotes", cast_to=object, body=body(training_file, 4, SMALL))
    assert quote["object"] == "fine_tuning.quote" and quote["fits"] is True
    assert quote["device_bytes"] == 2 * 2**30 and 0 < quote["per_rank_bytes"] <= 2 * 2**30
    assert quote["per_rank_bytes"] == sum(quote["components"].values())
    assert quote["total_steps"] == 8 and quote["trained_tokens"] > 32 * 20  # 32 pairs of dozens of tokens
    assert 0 < quote["estimated_seconds"] < 3600
    assert quote["device_hours"] == pytest.approx(quote["estimated_seconds"] / 3600, abs=1e-4)
    assert quote["efficiency_from"] == "this device type's default"  # no job on this base has finished here


def test_a_job_too_big_for_the_devices_is_quoted_as_not_fitting_and_refused_unless_forced(server, training_file):
    huge = body(training_file, 64, HUGE)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/fine_tuning/quotes", data=json.dumps(huge).encode(), method="POST",
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        quote = json.loads(response.read())
    assert quote["fits"] is False and quote["per_rank_bytes"] > 100 * 2**30
    assert "model.gradient_checkpointing=true" in quote["recommendation"]

    client = server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model=huge["model"], training_file=training_file, method=huge["method"], extra_body={"dpo_lora": HUGE}
        )
    assert refused.value.code == "does_not_fit" and refused.value.param == "dpo_lora"
    assert "model.gradient_checkpointing=true" in refused.value.message and "GiB per device" in refused.value.message
    assert client.fine_tuning.jobs.list().data == []  # nothing was queued

    forced = client.fine_tuning.jobs.create(
        model=huge["model"], training_file=training_file, method=huge["method"],
        extra_body={"dpo_lora": {**HUGE, "force": True}},
    )  # fmt: skip
    assert client.fine_tuning.jobs.cancel(forced.id).status == "cancelled"


def test_a_quote_names_what_is_wrong_with_its_request(server, training_file):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as unknown:
        client.post("/fine_tuning/quotes", cast_to=object, body=body("file-nope", 4, SMALL))
    assert unknown.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as bad_force:
        client.post("/fine_tuning/quotes", cast_to=object, body=body(training_file, 4, {**SMALL, "force": "yes"}))
    assert bad_force.value.param == "force"
