"""/v1/chat/completions and /v1/completions through the real `openai` client: base, fine-tuned and
checkpoint models, greedy answers equal to `dpo-lora generate`'s, streaming, concurrency, errors.

The base is a tiny Llama with a sharpened head (clear argmaxes, so greedy answers do not hinge on
the last bit of a batch's rounding), trained by two short jobs of the server itself.
"""

from __future__ import annotations

import threading
from pathlib import Path

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
    for options, param in (({"temperature": 3}, "temperature"), ({"n": 99}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
                           ({"max_tokens": 100000}, "max_tokens"), ({"tools": [{"type": "function"}]}, "tools"),
                           ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"max_tokens": 0}, "max_tokens")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=base, messages=ASK, **options)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="at most 32 answers per request"):
        client.completions.create(model=base, prompt=["The plot"] * 5, n=8, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="role: 'tool' is not supported"):
        greedy(client, base, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    with pytest.raises(openai.BadRequestError, match="token id 4000 is outside the model's vocabulary") as caught:
        client.completions.create(model=base, prompt=[[5, 6], [7, 4000]], max_tokens=1)
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="needs echo: true"):
        client.completions.create(model=base, prompt="The plot", max_tokens=0)


def test_chat_logprobs_cover_each_answer_token_streamed_or_not_and_their_bytes_spell_the_answer(trained):
    client, _, (first, _), _, _ = trained
    ask = dict(model=first, messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    answer = client.chat.completions.create(**ask)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens > 3, "one entry per completion token"
    assert (
        bytes(b for entry in content for b in entry.bytes).decode(errors="replace") == answer.choices[0].message.content
    )
    for entry in content:
        tops = [top.logprob for top in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == tops[0], "greedy takes the likeliest"
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(model=first, messages=ASK, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == answer.choices[0].message.content


def offline_greedy(run: Path, prompt: list[int], count: int) -> list[int]:
    """The fine-tuned model's greedy continuation by transformers' generate(), loaded outside the server."""
    import tempfile

    from dpo_lora.train.trained import load_trained

    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, _ = load_trained(str(run / "run"), Path(scratch))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    return [t for t in out[0, len(prompt) :].tolist() if t != tokenizer.eos_token_id]


def test_echoed_prompts_are_scored_as_lm_eval_harness_reads_them_and_agree_with_the_decoded_logprobs(trained):
    """lm-evaluation-harness' `local-completions` scores (context, continuation) by sending both as
    token ids with echo, logprobs 1 and max_tokens 1, and reads token_logprobs[ctxlen:-1]. Scored
    by one forward over the prompt, the greedy continuation must get the log-probs its decoding gave."""
    client, _, (first, _), run, _ = trained
    context = tiny_tokens("The plot was")
    made = client.completions.create(model=first, prompt=context, max_tokens=6, temperature=0, logprobs=2).choices[0]
    greedy_ids = offline_greedy(run, context, 6)
    assert len(made.logprobs.tokens) == len(greedy_ids) >= 2, "one entry per completion token"
    assert made.logprobs.text_offset[0] == len("The plot was"), "offsets count from the prompt's start"
    assert all(made.logprobs.top_logprobs[k][t] == lp for k, (t, lp) in enumerate(zip(made.logprobs.tokens, made.logprobs.token_logprobs, strict=True)))  # fmt: skip
    other = greedy_ids[:-1] + [next(t for t in tiny_tokens(" the end") if t != greedy_ids[-1])]
    scored = client.completions.create(model=first, prompt=[context + greedy_ids, context + other], max_tokens=1,
                                       temperature=0, logprobs=1, echo=True, seed=1234)  # lm-eval's payload  # fmt: skip
    results = []
    for choice, ctxlen in zip(sorted(scored.choices, key=lambda c: c.index), [len(context)] * 2, strict=True):
        logprobs = choice.logprobs.token_logprobs[ctxlen:-1]
        tops = choice.logprobs.top_logprobs[ctxlen:-1]
        results.append((sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops, strict=True))))
    assert results[0][0] == pytest.approx(sum(made.logprobs.token_logprobs), abs=1e-4)
    assert results[0][1] and not results[1][1], "the decoded continuation is the greedy one, the other is not"
    assert results[1][0] < results[0][0]
    assert len(scored.choices[1].logprobs.top_logprobs[-2]) == 2, "the likeliest token and the one sent, not likeliest"
    echoed = scored.choices[0]
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.top_logprobs[0] is None
    decoded = client.completions.create(model=first, prompt=context + greedy_ids, max_tokens=1, temperature=0, logprobs=1).choices[0]  # fmt: skip
    assert echoed.logprobs.tokens[-1:] == decoded.logprobs.tokens, "one token from the echo's own forward, as decoded"
    assert echoed.logprobs.token_logprobs[-1] == pytest.approx(decoded.logprobs.token_logprobs[0], abs=1e-5)
    assert len(echoed.logprobs.tokens) == len(context) + len(greedy_ids) + 1
    assert echoed.text.startswith("The plot was") and echoed.logprobs.text_offset[:2] == [0, len("The")]
    only = client.completions.create(model=first, prompt="The plot was", max_tokens=0, echo=True, logprobs=0).choices[0]
    assert only.text == "The plot was" and only.finish_reason == "length" and len(only.logprobs.tokens) == len(context)
    assert "".join(only.logprobs.tokens) == only.text
    assert only.logprobs.token_logprobs[1:] == pytest.approx(echoed.logprobs.token_logprobs[1 : len(context)], abs=1e-5)


def test_lm_evaluation_harness_scores_a_served_fine_tuned_model_as_the_model_does_offline(
    trained, tmp_path, monkeypatch
):
    """The real harness, as its users run it: `local-completions` (token-id prompts, echo) with the
    shipped task (examples/lm_eval) on four bundled held-out pairs. Each log-likelihood it reads
    must be the fine-tuned model's own, computed offline, and its accuracy must follow from them."""
    import tempfile

    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dpo_lora.train.trained import load_trained

    client, _, (first, _), run, _ = trained
    monkeypatch.setenv("OPENAI_API_KEY", client.api_key)  # the harness' key for local-completions
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local JSON task: no hub
    rows = (REPO / "data" / "sentiment" / "eval.jsonl").read_text().splitlines()[:4]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    task = yaml.safe_load((REPO / "examples" / "lm_eval" / "sentiment_preference.yaml").read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "pairs.jsonl")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(yaml.safe_dump(task))
    tokenizer_dir = run.parents[2] / "models" / "sharp-llama"
    args = {"model": first, "base_url": f"{client.base_url}completions", "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_retries": 1}  # fmt: skip
    out = simple_evaluate(model="local-completions", model_args=args, tasks=["sentiment_preference"],
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, _ = load_trained(str(run / "run"), Path(scratch))
    wins = []
    for sample in out["samples"]["sentiment_preference"]:
        scores = []
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            # the harness' split: the context's trailing whitespace goes with the continuation
            start = len(tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].double()
            offline = (
                torch.log_softmax(logits[start - 1 : -1], -1).gather(1, torch.tensor(whole[start:])[:, None]).sum()
            )
            assert response[0][0] == pytest.approx(float(offline), abs=2e-3), "the served model's own log-likelihood"
            scores.append(float(offline))
        wins.append(scores[0] > scores[1])
    assert len(wins) == 4 and out["results"]["sentiment_preference"]["acc,none"] == pytest.approx(sum(wins) / 4)


def test_the_reward_accuracy_example_over_the_api_is_dpo_lora_evals_offline(trained, tmp_path, tiny_tokenizer):
    """examples/served_reward_accuracy.py scores each completion under the fine-tuned model and its
    base through `echo`; its margins must be `dpo-lora eval`'s on the run (which loads the model
    itself and renders the pairs as training does), divided by beta."""
    import importlib.util

    from dpo_lora.commands.eval import evaluate_run

    client, base, (first, _), run, _ = trained
    rows = [{"prompt": [{"role": "user", "content": f"Review {i}: the plot"}],
             "chosen": [{"role": "assistant", "content": answer}], "rejected": [{"role": "assistant", "content": other}]}
            for i, (answer, other) in enumerate([("A fine film.", "Dull."), ("Loved it.", "It was bad."), ("Great.", "Poor acting.")])]  # fmt: skip
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = importlib.util.spec_from_file_location(
        "served_reward_accuracy", REPO / "examples" / "served_reward_accuracy.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    served = example.reward_accuracy(client, first, base, tiny_tokenizer, rows)
    offline = evaluate_run(str(run / "run"), data=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / "eval.json"))
    beta = 0.1  # the service's default dpo.beta, which these jobs trained with
    assert served["pairs"] == 3 and served["reward_accuracy"] == offline["reward_accuracy"]
    assert served["mean_logratio_margin"] * beta == pytest.approx(offline["mean_margin"], abs=1e-4)
