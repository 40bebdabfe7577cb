"""POST /v1/chat/completions and /v1/completions, as OpenAI's API has them, for every base under
--models, every fine-tuned model and every checkpoint model (`ft:...:ckpt-step-N`).

A request is checked and tokenized here, then answered by its base's engine (engine.py), which
batches it with whatever else waits for that base. `stream: true` sends OpenAI's server-sent
chunks; the answer waits on the event loop, holding no worker thread.

Log-probs as OpenAI reports them (logprobs_wire.py): `logprobs`/`top_logprobs` on chat,
`logprobs: k` on legacy completions, where `echo: true` also scores the prompt's tokens and a
prompt may be token ids. So lm-evaluation-harness' `local-completions` model can score a served
fine-tuned model's log-likelihoods (`max_tokens` 0 or 1, `echo`, `logprobs: 1`).
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from dpo_lora.model.decode import Sampling
from dpo_lora.serve import models
from dpo_lora.serve.engine import Engine, EngineError, Request
from dpo_lora.serve.inference import model_settings
from dpo_lora.serve.logprobs_wire import LegacyLogprobs, chat_logprobs
from dpo_lora.serve.state import Project, ServerState, State
from dpo_lora.serve.store import Job
from dpo_lora.serve.wire import ApiError

DEFAULT_MAX_TOKENS = {"chat": 512, "text": 16}  # OpenAI's legacy completions default to 16
MAX_N = 8
MAX_ROWS = 32  # answers in one request: prompts x n
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit)
POLL_S = 0.005
UNSUPPORTED = ("tools", "functions", "tool_choice", "logit_bias", "suffix", "audio")

router = APIRouter()


class Sampled(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's other fields (user, metadata, store) change nothing here
    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (the prompt scored, nothing made)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]]


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token; None: no log-probs
    echo: bool = False  # the prompt before the answer (with logprobs: its tokens scored too)


@router.post("/chat/completions")
async def chat_completions(state: State, project: Project, body: ChatRequest):
    request, engine, texts = await run_in_threadpool(_prepare, state, project, body, "chat")
    return await _answer(engine, request, body, "chat", texts)


@router.post("/completions")
async def completions(state: State, project: Project, body: CompletionRequest):
    request, engine, texts = await run_in_threadpool(_prepare, state, project, body, "text")
    return await _answer(engine, request, body, "text", texts)


def _prepare(state: ServerState, project: str, body: Sampled, kind: str) -> tuple[Request, Engine, list[str]]:
    """Check the request, find its model's engine and tokenize its prompts; the prompts' texts."""
    for name in UNSUPPORTED:
        if getattr(body, name, None) not in (None, False, [], {}):
            raise ApiError(400, f"{name}: not supported by dpo-lora serve", param=name)
    if getattr(body, "response_format", None) not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only text is supported", param="response_format")
    if kind == "chat" and body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    if body.max_tokens == 0 and not getattr(body, "echo", False):
        raise ApiError(400, "max_tokens: 0 asks for no answer; it needs echo: true", param="max_tokens")
    with state.store.session() as s:
        try:
            source = models.resolve(state.models, s, body.model, project)
        except models.UnknownModel as err:
            raise ApiError(404, str(err), param="model", code="model_not_found") from None
        directory = s.get(Job, source.job_id).directory if source.job_id else None
    engine = state.inference.engine(model_settings(source, directory, state.base_config))
    tokenizer = engine.tokenizer
    if kind == "chat":
        if not tokenizer.chat_template:
            raise ApiError(400, f"model '{body.model}' has no chat template; use /v1/completions", param="model")
        try:
            rendered = [tokenizer.apply_chat_template(_messages(body.messages), tokenize=False, add_generation_prompt=True)]  # fmt: skip
        except Exception as err:  # the template's own checks (jinja's raise_exception), e.g. roles out of order
            raise ApiError(400, f"messages: the model's chat template refused them: {err}", param="messages") from None
        prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    else:
        prompts, rendered = _text_prompts(body.prompt, tokenizer, engine.vocab_size)
    if len(rendered) * body.n > MAX_ROWS:
        raise ApiError(400, f"prompt: at most {MAX_ROWS} answers per request (prompts x n)", param="prompt")
    if any(not ids for ids in prompts):
        raise ApiError(400, "prompt: no tokens in it", param="messages" if kind == "chat" else "prompt")
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    limit = DEFAULT_MAX_TOKENS[kind] if limit is None else limit
    context = engine.context_length
    longest = max(map(len, prompts))
    if context and longest + limit > context:
        if body.max_tokens or getattr(body, "max_completion_tokens", None):
            message = f"the prompt ({longest} tokens) plus max_tokens ({limit}) exceed the model's context ({context})"
            raise ApiError(400, message, param="max_tokens", code="context_length_exceeded")
        limit = context - longest  # the default shrinks to what fits
        if limit < 1:
            raise ApiError(
                400, f"the prompt ({longest} tokens) fills the model's context ({context})", param="messages"
            )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "stop: at most 4 sequences", param="stop")
    sampling = Sampling(temperature=body.temperature, top_p=body.top_p, max_tokens=limit)
    if kind == "chat":
        logprobs, echo = ((body.top_logprobs or 0) if body.logprobs else None), False
    else:
        logprobs, echo = body.logprobs, body.echo
    request = Request(prompts, body.n, sampling, source.adapter, body.model, stops, body.seed, logprobs, echo)
    try:
        engine.submit(request)
    except EngineError as err:
        kind = "rate_limit_error" if err.status == 429 else "server_error"
        raise ApiError(err.status, str(err), code="engine_unavailable", kind=kind) from None
    return request, engine, rendered


def _text_prompts(prompt, tokenizer, vocab_size: int | None) -> tuple[list[list[int]], list[str]]:
    """Legacy completions' `prompt` (a text, texts, token ids, or lists of them) as token ids and texts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: empty", param="prompt")
    if isinstance(prompt[0], str):
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt], prompt
    for i, ids in enumerate(prompt):
        bad = next((t for t in ids if not 0 <= t < (vocab_size or len(tokenizer))), None)
        if bad is not None:
            message = f"prompt.{i}: token id {bad} is outside the model's vocabulary (0..{(vocab_size or len(tokenizer)) - 1})"  # fmt: skip
            raise ApiError(400, message, param="prompt")
    return prompt, [tokenizer.decode(ids) for ids in prompt]


def _messages(messages: list[Message]) -> list[dict]:
    """OpenAI messages as a chat template takes them: text content only; developer is system."""
    plain = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages.{i}.role: '{message.role}' is not supported", param=f"messages.{i}.role")
        content = message.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise ApiError(400, f"messages.{i}.content: only text parts are supported", param=f"messages.{i}.content")  # fmt: skip
            content = "".join(part["text"] for part in content)
        plain.append({"role": role, "content": content})
    return plain


async def _next(request: Request):
    """The request's next event, awaited without holding a thread."""
    while True:
        try:
            return request.events.get_nowait()
        except queue.Empty:
            await asyncio.sleep(POLL_S)


def _failed(event) -> ApiError:
    err: EngineError = event[1]
    return ApiError(err.status, str(err), code="engine_error", kind="server_error")


async def _answer(engine: Engine, request: Request, body: Sampled, kind: str, prompt_texts: list[str]):
    prefix, stamp = ("chatcmpl-" if kind == "chat" else "cmpl-"), int(time.time())
    head = {"id": prefix + uuid.uuid4().hex[:24], "created": stamp, "model": body.model, "system_fingerprint": None}
    prompt_tokens = sum(map(len, request.prompts))
    choices = len(request.prompts) * request.n
    prompt_of = [i // request.n for i in range(choices)]  # each choice's prompt
    legacy = [LegacyLogprobs(engine.token_texts, 0 if request.echo else len(prompt_texts[p])) for p in prompt_of]

    def logprobs(i: int, scored: list, tokens: list[int] | None = None) -> dict | None:
        """Choice i's log-probs of these tokens, in its API's shape; None where none were asked for."""
        if request.logprobs is None:
            return None
        return chat_logprobs(engine.token_texts, scored) if kind == "chat" else legacy[i](scored, tokens)

    if not body.stream:
        texts = [prompt_texts[p] if request.echo else "" for p in prompt_of]
        ends, scored, completion_tokens = [None] * choices, [[] for _ in range(choices)], 0
        while (event := await _next(request))[0] != "done":
            if event[0] == "error":
                raise _failed(event)
            if event[0] == "prompt":
                scored[event[1]] += event[2]
            elif event[0] == "text":
                texts[event[1]] += event[2]
                scored[event[1]] += event[3]
            else:
                ends[event[1]] = event[2]
                completion_tokens += event[3]
                scored[event[1]] += event[4]
        tokens = [request.prompts[p] if request.echo else [] for p in prompt_of]  # ids of the unscored (the first)
        return {**head, "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [_choice(kind, i, texts[i], ends[i], logprobs(i, scored[i], tokens[i])) for i in range(choices)],
                "usage": _usage(prompt_tokens, completion_tokens)}  # fmt: skip
    first = await _next(request)  # a model that fails to load is an error response, not a broken stream
    if first[0] == "error":
        raise _failed(first)
    usage = bool((body.stream_options or {}).get("include_usage"))
    chunk = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

    def sse(choices_: list[dict], **extra) -> str:
        return f"data: {json.dumps({**chunk, 'choices': choices_, **({'usage': None} if usage else {}), **extra})}\n\n"

    def piece(i: int, text: str, finish: str | None, scored: list, tokens: list[int] | None = None) -> str:
        if kind == "chat":
            return sse([_delta(i, {"content": text} if text or not finish else {}, finish, logprobs(i, scored))])
        return sse([_choice(kind, i, text, finish, logprobs(i, scored, tokens))])

    async def chunks():
        event, completion_tokens = first, 0
        try:
            if kind == "chat":
                yield sse([_delta(i, {"role": "assistant", "content": ""}, None) for i in range(choices)])
            if request.echo and request.logprobs is None:  # with log-probs the prompt comes as an event
                for i in range(choices):
                    yield piece(i, prompt_texts[prompt_of[i]], None, [])
            while event[0] != "done":
                if event[0] == "error":
                    yield f"data: {json.dumps(_failed(event).body())}\n\n"
                    return
                if event[0] == "prompt":
                    yield piece(event[1], prompt_texts[prompt_of[event[1]]], None, event[2], request.prompts[prompt_of[event[1]]])  # fmt: skip
                elif event[0] == "text":
                    yield piece(event[1], event[2], None, event[3])
                else:
                    completion_tokens += event[3]
                    yield piece(event[1], "", event[2], event[4])
                event = await _next(request)
            if usage:
                yield sse([], usage=_usage(prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            request.cancelled.set()  # a client that went away stops its rows

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _choice(kind: str, index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    if kind == "chat":
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def _delta(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
