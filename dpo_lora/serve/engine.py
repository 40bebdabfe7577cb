"""The inference engine behind /v1/chat/completions and /v1/completions.

One `Engine` holds one base, loaded as it trained (quantized, in its dtype), on one device, with
the adapters of the fine-tuned models it answers for attached by name. Its worker thread takes
every request waiting, decodes them as one batch (each row with its own adapter: `decode()`),
and hands each request its text as it is made (`answers.Answers`). Requests that arrive while a
batch decodes join it between steps while it has room (continuous batching), and each request
ends as its own rows do. Adapters load on first use and the least recently
used goes when more than `max_adapters` are held. A base idle for `idle_s` is unloaded, and its
device handed back.

`Inference` finds the engine of a model's settings, making and placing it on first use.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpo_lora.model import precision
from dpo_lora.model.decode import BASE, Row, Sampling, adapter_groups, decode, prompt_logprobs
from dpo_lora.serve.answers import Answers
from dpo_lora.serve.logprobs_wire import TokenTexts

CLOSE = object()  # an engine's queue item: unload and end the worker
MAX_WAITING = 64  # requests queued for one engine; past it a request is a 429
# Rows one batch takes in over its life. Under steady traffic a batch never empties, and what it
# keeps of ended rows grows; past this it takes no more, drains, and the next batch starts afresh.
MAX_ROWS_PER_BATCH = 1024


class EngineError(Exception):
    """The engine could not answer (no device free, a base or adapter that does not load)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One API request: `n` answers to each prompt, all with one adapter and one sampling rule.
    Its `events` queue gets, per choice, ("prompt", choice, scored) where it echoes its prompt's
    log-probs, ("text", choice, piece, scored) as text settles and ("end", choice, finish_reason,
    tokens, scored); then ("done",); or ("error", EngineError) instead. `scored` lists the
    `decode.Scored` of the tokens since the last event, where the request asked for log-probs
    (`logprobs` alternatives each), else it is empty."""

    prompts: list[list[int]]
    n: int
    sampling: Sampling
    adapter: Path | None  # None: the base alone
    label: str  # the model id, for the log
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: no log-probs
    echo: bool = False  # with logprobs: score the prompt's tokens too
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def model_key(model_config) -> str:
    """What makes two runs' bases the same loaded model: the folder and how it is loaded."""
    fields = ("path", "quantization", "dtype", "float32_residual", "trust_remote_code", "attn_implementation")
    return json.dumps({name: getattr(model_config, name) for name in fields}, sort_keys=True)


class Engine:
    def __init__(self, model_config, place: Callable[[], str], *, max_adapters: int = 8, max_rows: int = 16,
                 idle_s: float = 600.0, on_unload: Callable[[], None] | None = None) -> None:  # fmt: skip
        """`place()` names the device to load on ('cpu' or a CUDA index), `on_unload()` hands it back."""
        from dpo_lora.model.load import load_tokenizer

        self.model_config = dataclasses.replace(model_config, gradient_checkpointing=False)
        self.place, self.on_unload = place, on_unload
        self.max_adapters, self.max_rows, self.idle_s = max_adapters, max_rows, idle_s
        self.device_name: str | None = None  # where the base is loaded now
        self.tokenizer = load_tokenizer(self.model_config)
        self.token_texts = TokenTexts(self.tokenizer)  # log-probs' token texts and bytes
        self.context_length, self.vocab_size = _sizes(self.model_config)
        self.model = None
        self.adapters: collections.OrderedDict[Path, str] = collections.OrderedDict()  # folder -> PEFT name
        self.waiting: collections.deque = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        self.eos_ids: set[int] = {self.tokenizer.eos_token_id}
        self.thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self.thread.start()

    # -- what the API calls ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self.ready:
            if self.closed:
                raise EngineError("the engine was closed; retry", 503)
            if len(self.waiting) >= MAX_WAITING:
                raise EngineError(f"{MAX_WAITING} requests already wait for this model; retry later", 429)
            self.waiting.append(request)
            self.ready.notify()

    def close(self) -> None:
        """Finish what is queued, then unload and end the worker."""
        with self.ready:
            self.closed = True
            self.waiting.append(CLOSE)
            self.ready.notify()

    # -- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:  # idle: give the memory and the device back until the next request
                self._unload()
                continue
            if batch and batch[-1] is CLOSE:
                batch.pop()
                self._answer(batch)
                self._unload()
                return
            self._answer(batch)

    def _next_batch(self) -> list | None:
        """Every waiting request that fits one batch (rows, adapters); None after idle_s of nothing."""
        with self.ready:
            if not self.waiting and not self.ready.wait_for(lambda: self.waiting, self.idle_s if self.model else None):
                return None
            batch, rows, adapters = [], 0, set()
            while self.waiting:
                head = self.waiting[0]
                if head is CLOSE:
                    batch.append(self.waiting.popleft())
                    break
                more = {head.adapter} - adapters - {None}
                if batch and (rows + head.rows > self.max_rows or len(adapters | more) > self.max_adapters):
                    break
                batch.append(self.waiting.popleft())
                rows, adapters = rows + head.rows, adapters | more
            return batch

    def _answer(self, batch: list[Request]) -> None:
        """Decode the batch; requests that wait meanwhile join it between steps while it has room."""
        answers = Answers(self.tokenizer, self.eos_ids)
        rows = self._rows(batch, answers)
        if not rows:
            return
        try:
            decode(self.model, rows, self.eos_ids, self.tokenizer.pad_token_id, answers.on_token, answers.on_done,
                   admit=lambda: self._admit(answers))  # fmt: skip
        except Exception as err:  # noqa: BLE001
            answers.fail(EngineError(f"decoding failed: {type(err).__name__}: {err}"))

    def _rows(self, requests: list[Request], answers: Answers) -> list[Row]:
        """The requests' rows (their adapters loaded, echoed prompts scored); a request whose model
        does not load gets its error, not the server."""
        rows = []
        for request in requests:
            if request.cancelled.is_set():
                continue
            try:
                self._load()
                name = self._adapter(request.adapter, request.label)
            except Exception as err:  # noqa: BLE001
                request.events.put(("error", _load_error(err)))
                continue
            try:
                rows += answers.add(request, name, self._echo_logprobs(request, name))
            except Exception as err:  # noqa: BLE001
                request.events.put(("error", EngineError(f"decoding failed: {type(err).__name__}: {err}")))
        return rows

    def _admit(self, answers: Answers) -> list[Row]:
        """Waiting requests that join the running batch: while rows and adapters stay within the
        engine's limits and PEFT can run their adapters beside the live ones (not DoRA's)."""
        budget = MAX_ROWS_PER_BATCH - answers.rows()
        live = answers.live_names()
        folders = {folder for folder, name in self.adapters.items() if name in live}
        for folder in folders:  # loading another adapter must not evict one in use
            self.adapters.move_to_end(folder)
        taken, rows = [], answers.live_rows()
        with self.ready:
            while self.waiting and self.waiting[0] is not CLOSE:
                head = self.waiting[0]
                more = folders | ({head.adapter} - {None})
                if rows + head.rows > self.max_rows or len(more) > self.max_adapters or head.rows > budget:
                    break
                taken.append(self.waiting.popleft())
                rows, folders, budget = rows + head.rows, more, budget - head.rows
        fits = []
        for index, request in enumerate(taken):
            try:
                name = self._adapter(request.adapter, request.label)
            except Exception as err:  # noqa: BLE001
                request.events.put(("error", _load_error(err)))
                continue
            if len(adapter_groups(self.model, [*live, name])) > 1:  # DoRA beside other adapters
                with self.ready:  # back to the front, in order: the next batch takes them
                    self.waiting.extendleft(reversed(taken[index:]))
                break
            fits.append(request)
            live.append(name)
        return self._rows(fits, answers)

    def _echo_logprobs(self, request: Request, name: str) -> dict[int, torch.Tensor]:
        """For a request that echoes with log-probs: its prompts' scored tokens, sent as "prompt"
        events for every choice; the logits after each prompt, by prompt index."""
        after_prompt = {}
        if request.echo and request.logprobs is not None:
            for p, prompt in enumerate(request.prompts):
                scored, logits = prompt_logprobs(self.model, prompt, name, request.logprobs)
                after_prompt[p] = logits
                for k in range(request.n):
                    request.events.put(("prompt", p * request.n + k, scored))
        return after_prompt

    def _load(self) -> None:
        if self.model is not None:
            return
        from dpo_lora.model.load import load_base

        self.device_name = self.place()
        native = precision.bf16_is_native(_torch_device(self.device_name).type)
        self.model_config = precision.resolved(self.model_config, native)
        start = time.monotonic()
        try:
            self.model = load_base(self.model_config, _torch_device(self.device_name)).eval()
        except BaseException:
            self._release()
            raise
        generation = getattr(self.model, "generation_config", None)
        extra = getattr(generation, "eos_token_id", None)
        self.eos_ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        q = self.model_config.quantization
        log(f"loaded {self.model_config.path} ({q}, {self.model_config.dtype}) on {self.device_name} in {time.monotonic() - start:.1f} s")  # fmt: skip

    def _adapter(self, folder: Path | None, label: str) -> str:
        """The PEFT name of `folder`'s adapter, loading it (and dropping the least recently used)."""
        if folder is None:
            return BASE
        if folder in self.adapters:
            self.adapters.move_to_end(folder)
            return self.adapters[folder]
        from dpo_lora.model.load import attach_trained

        start = time.monotonic()
        name = "ft_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
        self.model = attach_trained(self.model, folder, name, self.model_config).eval()
        self.adapters[folder] = name
        self.model.set_adapter(name)  # the active one is never the one evicted
        while len(self.adapters) > self.max_adapters:
            _, old = self.adapters.popitem(last=False)
            self.model.delete_adapter(old)
        log(f"loaded adapter of {label} in {time.monotonic() - start:.2f} s ({len(self.adapters)} held)")
        return name

    def _unload(self) -> None:
        if self.model is None:
            return
        self.model, self.adapters = None, collections.OrderedDict()
        import gc

        gc.collect()
        if self.device_name != "cpu":
            torch.cuda.empty_cache()
        log(f"unloaded {self.model_config.path} from {self.device_name}")
        self._release()

    def _release(self) -> None:
        if self.on_unload is not None:
            self.on_unload()
        self.device_name = None


def _load_error(err: Exception) -> EngineError:
    if isinstance(err, EngineError):
        return err
    return EngineError(f"the model did not load: {type(err).__name__}: {(str(err) or ' ').splitlines()[0]}")


def _torch_device(name: str) -> torch.device:
    return torch.device("cpu") if name == "cpu" else torch.device("cuda", int(name))


def log(message: str) -> None:
    print(f"dpo-lora serve: inference: {message}", file=sys.stderr, flush=True)


def _sizes(model_config) -> tuple[int | None, int | None]:
    """The model's context length and vocabulary size (token ids a prompt may hold), from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_config.path, trust_remote_code=model_config.trust_remote_code)
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None), getattr(text, "vocab_size", None)
