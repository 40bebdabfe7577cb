"""POST /v1/chat/completions and /v1/completions, as OpenAI's API has them, for every base under
--models, every fine-tuned model and every checkpoint model (`ft:...:ckpt-step-N`).

A request is checked and tokenized here, then answered by its base's engine (engine.py), which
batches it with whatever else waits for that base. `stream: true` sends OpenAI's server-sent
chunks; the answer waits on the event loop, holding no worker thread.
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
from dpo_lora.serve.state import ServerState, State
from dpo_lora.serve.store import Job
from dpo_lora.serve.wire import ApiError

DEFAULT_MAX_TOKENS = {"chat": 512, "text": 16}  # OpenAI's legacy completions default to 16
MAX_N = 8
MAX_ROWS = 32  # answers in one request: prompts x n
POLL_S = 0.005
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "tool_choice", "logit_bias", "suffix", "audio")

router = APIRouter()


class Sampled(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's other fields (user, metadata, store) change nothing here
    model: str
    max_tokens: int | None = Field(None, ge=1)
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


class CompletionRequest(Sampled):
    prompt: str | list[str]


@router.post("/chat/completions")
async def chat_completions(state: State, body: ChatRequest):
    request, engine = await run_in_threadpool(_prepare, state, body, "chat")
    return await _answer(engine, request, body, "chat")


@router.post("/completions")
async def completions(state: State, body: CompletionRequest):
    request, engine = await run_in_threadpool(_prepare, state, body, "text")
    return await _answer(engine, request, body, "text")


def _prepare(state: ServerState, body: Sampled, kind: str) -> tuple[Request, Engine]:
    """Check the request, find its model's engine and tokenize its prompts."""
    for name in UNSUPPORTED:
        if getattr(body, name, None) not in (None, False, [], {}):
            raise ApiError(400, f"{name}: not supported by dpo-lora serve", param=name)
    if getattr(body, "response_format", None) not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only text is supported", param="response_format")
    with state.store.session() as s:
        try:
            source = models.resolve(state.models, s, body.model)
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
    else:
        rendered = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not rendered:
            raise ApiError(400, "prompt: empty", param="prompt")
    if len(rendered) * body.n > MAX_ROWS:
        raise ApiError(400, f"prompt: at most {MAX_ROWS} answers per request (prompts x n)", param="prompt")
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    if any(not ids for ids in prompts):
        raise ApiError(400, "prompt: no tokens in it", param="messages" if kind == "chat" else "prompt")
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens or DEFAULT_MAX_TOKENS[kind]
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
    request = Request(prompts, body.n, sampling, source.adapter, body.model, stops, body.seed)
    try:
        engine.submit(request)
    except EngineError as err:
        kind = "rate_limit_error" if err.status == 429 else "server_error"
        raise ApiError(err.status, str(err), code="engine_unavailable", kind=kind) from None
    return request, engine


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


async def _answer(engine: Engine, request: Request, body: Sampled, kind: str):
    prefix, stamp = ("chatcmpl-" if kind == "chat" else "cmpl-"), int(time.time())
    head = {"id": prefix + uuid.uuid4().hex[:24], "created": stamp, "model": body.model, "system_fingerprint": None}
    prompt_tokens = sum(map(len, request.prompts))
    choices = len(request.prompts) * request.n
    if not body.stream:
        texts, ends, completion_tokens = [""] * choices, [None] * choices, 0
        while (event := await _next(request))[0] != "done":
            if event[0] == "error":
                raise _failed(event)
            if event[0] == "text":
                texts[event[1]] += event[2]
            else:
                ends[event[1]] = event[2]
                completion_tokens += event[3]
        return {**head, "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [_choice(kind, i, texts[i], ends[i]) for i in range(choices)],
                "usage": _usage(prompt_tokens, completion_tokens)}  # fmt: skip
    first = await _next(request)  # a model that fails to load is an error response, not a broken stream
    if first[0] == "error":
        raise _failed(first)
    usage = bool((body.stream_options or {}).get("include_usage"))
    chunk = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

    def sse(choices_: list[dict], **extra) -> str:
        return f"data: {json.dumps({**chunk, 'choices': choices_, **({'usage': None} if usage else {}), **extra})}\n\n"

    async def chunks():
        event, completion_tokens = first, 0
        try:
            if kind == "chat":
                yield sse([_delta(i, {"role": "assistant", "content": ""}, None) for i in range(choices)])
            while event[0] != "done":
                if event[0] == "error":
                    yield f"data: {json.dumps(_failed(event).body())}\n\n"
                    return
                if event[0] == "text":
                    yield sse([_delta(event[1], {"content": event[2]}, None) if kind == "chat" else _choice(kind, event[1], event[2], None)])  # fmt: skip
                else:
                    completion_tokens += event[3]
                    yield sse([_delta(event[1], {}, event[2]) if kind == "chat" else _choice(kind, event[1], "", event[2])])  # fmt: skip
                event = await _next(request)
            if usage:
                yield sse([], usage=_usage(prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            request.cancelled.set()  # a client that went away stops its rows

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _choice(kind: str, index: int, text: str, finish: str | None) -> dict:
    if kind == "chat":
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _delta(index: int, delta: dict, finish: str | None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
