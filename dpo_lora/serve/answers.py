"""The rows an engine decodes together and what each request hears of them.

A request brings `len(prompts) * n` rows. `Answers` numbers them as `decode()` does (requests
joining a running batch get the next numbers), turns each row's tokens into text as it settles
(`TextStream`, stop strings), and puts the request's events on its queue: ("text", ...) as text
settles, ("end", ...) as each of its rows ends, then ("done",) once all of them have. A request
that joins a running batch never waits for the rows that were there before it.
"""

from __future__ import annotations

import dataclasses

import torch

from dpo_lora.model.decode import Row, Scored, first_token
from dpo_lora.serve.text_stream import TextStream


class Answers:
    def __init__(self, tokenizer, eos_ids: set[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.owners: list[tuple[object, int]] = []  # row -> (request, choice)
        self.names: list[str] = []  # row -> its PEFT adapter name
        self.streams: list[TextStream] = []
        self.counts: list[int] = []  # tokens made, EOS not counted
        self.pending: list[list[Scored]] = []  # scored tokens not yet handed on
        self.left: dict[int, int] = {}  # id(request) -> its rows not ended
        self.requests: dict[int, object] = {}  # id(request) -> the request, while it has rows left

    def add(self, request, name: str, after_prompt: dict[int, torch.Tensor]) -> list[Row]:
        """The request's rows, numbered after those so far. A prompt whose logits are at hand
        (`after_prompt`, by prompt index: its echo's forward) and that wants one token gets it
        from them, and its row then asks decode for none (lm-evaluation-harness's ask)."""
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        rows = []
        self.requests[id(request)], self.left[id(request)] = request, request.rows
        for p, prompt in enumerate(request.prompts):
            for k in range(request.n):
                row = Row(prompt, request.sampling, name, generator, request.logprobs)
                i = len(self.owners)
                self.owners.append((request, p * request.n + k))
                self.names.append(name)
                self.streams.append(TextStream(self.tokenizer, request.stops))
                self.counts.append(0)
                self.pending.append([])
                if p in after_prompt and request.sampling.max_tokens == 1:
                    self.on_token(i, *first_token(after_prompt[p], row))
                    row = dataclasses.replace(row, sampling=dataclasses.replace(row.sampling, max_tokens=0))
                rows.append(row)
        return rows

    def on_token(self, i: int, token: int, score: Scored | None) -> bool:
        """decode's on_token: the row's text so far to its request; False ends the row."""
        request, choice = self.owners[i]
        if token not in self.eos_ids:
            self.counts[i] += 1
            self.pending[i] += [score] if score else []
            if piece := self.streams[i].push(token):
                request.events.put(("text", choice, piece, _taken(self.pending[i])))
        return not (self.streams[i].stopped or request.cancelled.is_set())

    def on_done(self, i: int) -> None:
        """decode's on_done: the row's last text and its end; the request's done with its last row."""
        request, choice = self.owners[i]
        if piece := self.streams[i].finish():
            request.events.put(("text", choice, piece, _taken(self.pending[i])))
        ended = self.streams[i].stopped or self.counts[i] < request.sampling.max_tokens
        request.events.put(("end", choice, "stop" if ended else "length", self.counts[i], _taken(self.pending[i])))
        self.left[id(request)] -= 1
        if not self.left[id(request)]:
            request.events.put(("done",))
            del self.requests[id(request)]

    def rows(self) -> int:
        """Rows taken in so far, ended or not."""
        return len(self.owners)

    def live_rows(self) -> int:
        return sum(self.left[key] for key in self.requests)

    def live_names(self) -> list[str]:
        """The adapter names of the rows of requests not done (one per row, ended rows too)."""
        live = set(self.requests)
        return [name for (request, _), name in zip(self.owners, self.names, strict=True) if id(request) in live]

    def fail(self, err: Exception) -> None:
        """Every request with rows left gets `err` instead of the rest of its answer."""
        for request in self.requests.values():
            request.events.put(("error", err))
        self.requests.clear()


def _taken(items: list) -> list:
    """The items, leaving the list empty."""
    taken = items[:]
    items.clear()
    return taken
