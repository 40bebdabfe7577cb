"""/v1/chat/completions and /v1/completions through the real `openai` client: base, fine-tuned and
checkpoint models, greedy answers equal to `dpo-lora generate`'s, streaming, concurrency, errors.

The base is a tiny Llama with a sharpened head (clear argmaxes, so greedy answers do not hinge on
the last bit of a batch's rounding), trained by two short jobs of the server itself.
"""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from ..conftest import REPO, SENTIMENT_TRAIN, build_tiny_model
from .conftest import Server, openai_rows, wait_for_status, write_jsonl

PROMPT = "Continue this movie review with one sentence"
ASK = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    """(client, base id, two fine-tuned model ids, the first job's run folder, a checkpoint model id)."""
    root = tmp_path_factory.mktemp("completions")
    model = build_tiny_model(len(tiny_tokenizer), seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(root / "models" / "sharp-llama")
    tiny_tokenizer.save_pretrained(root / "models" / "sharp-llama")
    config = root / "base.yaml"
    config.write_text(
        "model: {dtype: float32}\nlora: {dropout: 0.0}\ndata: {max_length: 96, max_prompt_length: 64}\n"
        "train: {micro_batch_size: 4, lr: 2.0e-2, warmup_ratio: 0, save_every: 2, keep_checkpoints: 0, max_steps: 4}\n"
        f"deepspeed: {REPO / 'deepspeed_configs' / 'zero2.json'}\n"
    )
    train = write_jsonl(root / "train.jsonl", openai_rows(SENTIMENT_TRAIN, 32))
    (root / "state").mkdir()
    server = Server(root / "state", root / "models", config, "--cpu-slots", "2").start()
    client = server.client()
    file_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    jobs = [
        client.fine_tuning.jobs.create(model="sharp-llama", training_file=file_id, method={"type": "dpo"}, seed=seed)
        for seed in (1, 2)
    ]
    jobs = [wait_for_status(client, job.id, ("succeeded",), timeout=600) for job in jobs]
    checkpoint = client.fine_tuning.jobs.checkpoints.list(jobs[0].id).data[-1].fine_tuned_model_checkpoint
    yield (
        client,
        "sharp-llama",
        [job.fine_tuned_model for job in jobs],
        root / "state" / "jobs" / jobs[0].id,
        checkpoint,
    )
    server.stop()


def greedy(client, model: str, messages=ASK, **options) -> str:
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12, **options)
    return answer.choices[0].message.content


def test_a_fine_tuned_models_greedy_answer_is_dpo_lora_generates_and_differs_from_the_base(trained, tmp_path):
    from dpo_lora.commands.generate import generate_run

    client, base, (first, _), run, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    offline = generate_run(str(run / "run"), str(prompts), n=1, temperature=0, max_new_tokens=12, out=str(tmp_path / "g.json"))  # fmt: skip
    served = greedy(client, first)
    assert served == offline["samples"][0]["policy"][0]
    assert greedy(client, base) == offline["samples"][0]["reference"][0], "the base is the reference, adapter off"
    assert served != greedy(client, base), "training changed the answer"


def test_streamed_chunks_join_to_the_answer_and_report_usage(trained):
    client, _, (first, _), _, _ = trained
    whole = client.chat.completions.create(model=first, messages=ASK, temperature=0.8, seed=11, max_tokens=10)
    chunks = list(
        client.chat.completions.create(model=first, messages=ASK, temperature=0.8, seed=11, max_tokens=10, stream=True,
                                       stream_options={"include_usage": True})
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content, "a seed makes the sample repeatable, streamed or not"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]  # fmt: skip
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens <= 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 5


def test_completions_take_n_stop_and_max_tokens(trained):
    client, base, _, _, _ = trained
    answer = client.completions.create(model=base, prompt="The plot was", n=3, max_tokens=6, seed=2, temperature=1.0)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("length", "stop") for c in answer.choices)
    assert 3 <= answer.usage.completion_tokens <= 18
    assert answer.usage.prompt_tokens == len(tiny_tokens("The plot was")), "the prompt counts once for its n answers"
    full = client.completions.create(model=base, prompt="The plot was", max_tokens=8, temperature=0).choices[0]
    cut = full.text[2:4]  # a stop string from inside the greedy answer ends it just before
    stopped = client.completions.create(model=base, prompt="The plot was", max_tokens=8, temperature=0, stop=[cut])
    assert stopped.choices[0].text == full.text[: full.text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def tiny_tokens(text: str) -> list[int]:
    from ..conftest import build_tiny_tokenizer

    return build_tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_two_concurrent_requests_to_two_adapters_and_a_checkpoint_each_answer_as_alone(trained):
    client, _, models, _, checkpoint = trained
    alone = {model: greedy(client, model) for model in [*models, checkpoint]}
    assert alone[models[0]] != alone[models[1]], "two jobs with other seeds trained other adapters"
    together, barrier = {}, threading.Barrier(3)

    def ask(model):
        barrier.wait()
        together[model] = greedy(client, model)

    threads = [threading.Thread(target=ask, args=(m,)) for m in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_unknown_models_and_bad_parameters_are_openai_errors(trained):
    client, base, (first, _), _, _ = trained
    with pytest.raises(openai.NotFoundError, match="not one this server knows"):
        greedy(client, "ft:sharp-llama:dpo-lora::nope")
    with pytest.raises(openai.NotFoundError, match="no checkpoint at step 999"):
        greedy(client, f"{first}:ckpt-step-999")
    for options, param in (({"temperature": 3}, "temperature"), ({"n": 99}, "n"), ({"logprobs": True}, "logprobs"),
                           ({"max_tokens": 100000}, "max_tokens")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=base, messages=ASK, **options)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="at most 32 answers per request"):
        client.completions.create(model=base, prompt=["The plot"] * 5, n=8, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="role: 'tool' is not supported"):
        greedy(client, base, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
