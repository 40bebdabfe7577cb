"""Batched decoding where every row brings its own adapter, sampling settings, seed and length.

`generate()` of transformers takes one set of sampling settings per call, one random stream, and
streams only a batch of one. A server batches requests that differ in all three, and streams each
row as it goes, so it decodes with this loop: one prefill of the left-padded prompts, then one
token per step through the KV cache, each row picked by its own rule.

    prefill:  logits[:, -1] of the prompts, cache filled
    step:     token_i = pick(logits_i, sampling_i, generator_i)      for every live row i
              on_token(i, token_i) -> keep going?  (EOS, max_tokens and the caller end a row)
              logits = model(tokens of live rows, cache)

Rows that end leave the batch (the cache drops them), so a long answer does not make the short
ones' rows compute on; rows that arrive meanwhile join between steps (`admit`: their own prefill,
then their cache merged into the batch's). With a PeftModel each row runs its own adapter (PEFT's
mixed-batch forward); `BASE` runs the base alone.

A row that asks for log-probs gets, with each token, log softmax(logits)[token] of the model's own
distribution (before temperature and top_p, as OpenAI's and vLLM's APIs report them) and its
`logprobs` most likely alternatives. `prompt_logprobs()` scores a prompt's own tokens the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy (the most likely token)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose probabilities reach top_p
    max_tokens: int = 16


@dataclass
class Row:
    prompt: list[int]  # token ids
    sampling: Sampling
    adapter: str = BASE
    generator: torch.Generator | None = None  # a seeded stream; None: torch's global one
    logprobs: int | None = None  # report each token's log-prob and this many alternatives; None: none


@dataclass(frozen=True)
class Scored:
    """One token's log-prob under the model, and the `k` most likely tokens there (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def scored(logprobs: torch.Tensor, token: int, k: int) -> Scored:
    """`token`'s entry in one position's log-probs [V], with the k most likely tokens."""
    values, ids = logprobs.topk(k)
    return Scored(token, float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist(), strict=True)))


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's logits [V]: argmax at temperature 0, else a sample of
    softmax(logits / temperature) restricted to the smallest set of tokens whose probability
    reaches top_p (the most likely token always stays)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability of the tokens ranked above each
        sorted_probs[before >= sampling.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    choice = torch.multinomial(probs.to(generator.device if generator else probs.device), 1, generator=generator)
    return int(choice)


OnToken = Callable[[int, int, Scored | None], bool]


def decode(
    model,
    rows: list[Row],
    eos_ids: set[int],
    pad_id: int,
    on_token: OnToken,
    on_done: Callable[[int], None] | None = None,
    admit: Callable[[], list[Row]] | None = None,
) -> None:
    """Decode every row until it picks an EOS, reaches its max_tokens (a row with 0 picks none), or
    `on_token(row, token, scored)` returns False (a stop string, a cancelled request). `on_token`
    sees every picked token, EOS included, in order per row; `scored` is its log-probs where the
    row asked for them, else None. `on_done(row)` is called as each row ends.

    `admit()`, called between steps, returns rows that join the batch (continuous batching): they
    are numbered after the rows so far, prefilled on their own and merged into the running cache,
    each left-padded to the longer. The caller admits only rows `adapter_groups` lets share a
    forward with the live ones; a cache that can't be merged (not every layer a plain
    DynamicLayer) admits nothing."""
    done = on_done or (lambda row: None)
    groups = adapter_groups(model, [row.adapter for row in rows])
    if len(groups) > 1:  # DoRA: one adapter per forward, so each adapter's rows decode in turn
        for group in groups:
            decode(model, [rows[i] for i in group], eos_ids, pad_id,
                   lambda j, *token, g=group: on_token(g[j], *token), lambda j, g=group: done(g[j]))  # fmt: skip
        return
    rows, device, cache_key = list(rows), next(model.parameters()).device, _cache_argument(model)
    counts = [0] * len(rows)
    live: list[int] = []  # rows still decoding, in batch order
    ids = mask = cache = None
    joining = list(range(len(rows)))

    def picked(slots: list[int], logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Each slot's row picks from its logits; (the tokens, the slots) of the rows going on."""
        logprobs = _logprobs_if_asked(logits, [rows[i].logprobs for i in slots])
        tokens, keep = [], []
        for slot, i in enumerate(slots):
            token = pick(logits[slot], rows[i].sampling, rows[i].generator)
            counts[i] += 1
            score = None if rows[i].logprobs is None else scored(logprobs[slot], token, rows[i].logprobs)
            if on_token(i, token, score) and token not in eos_ids and counts[i] < rows[i].sampling.max_tokens:
                tokens.append(token)
                keep.append(slot)
            else:
                done(i)
        return tokens, keep

    def forward(step_ids, step_mask, step_cache, names):
        positions = (step_mask.cumsum(1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        with adapter_arguments(model, names) as adapters:
            out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{cache_key: step_cache}, **adapters)  # fmt: skip
        return getattr(out, cache_key), out.logits[:, -1]

    with torch.no_grad():
        while True:
            for i in [i for i in joining if rows[i].sampling.max_tokens <= 0]:
                done(i)
            joining = [i for i in joining if rows[i].sampling.max_tokens > 0]
            if joining:  # prefill the new rows on their own, then merge them into the batch
                new_ids, new_mask = _left_padded([rows[i].prompt for i in joining], pad_id, device)
                new_cache, logits = forward(new_ids, new_mask, None, [rows[i].adapter for i in joining])
                tokens, keep = picked(joining, logits)
                if keep:
                    new_ids, new_mask = _kept(new_cache, new_mask, keep, len(joining), tokens, device)
                    joined = [joining[k] for k in keep]
                    if not live:
                        live, ids, mask, cache = joined, new_ids, new_mask, new_cache
                    else:
                        mask = _merge(cache, new_cache, mask, new_mask)
                        live, ids = live + joined, torch.cat([ids, new_ids])
                joining = []
            if live:
                cache, logits = forward(ids, mask, cache, [rows[i].adapter for i in live])
                tokens, keep = picked(live, logits)
                if keep:
                    ids, mask = _kept(cache, mask, keep, len(live), tokens, device)
                live = [live[slot] for slot in keep]
            more = admit() if admit is not None and (not live or _mergeable(cache)) else []
            if more:
                joining = list(range(len(rows), len(rows) + len(more)))
                rows += more
                counts += [0] * len(more)
            elif not live:
                return


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [rows, longest] of the prompts, left-padded."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _kept(cache, mask: torch.Tensor, keep: list[int], rows: int, tokens: list[int], device):
    """(next ids, next mask) of the rows going on; the cache keeps only theirs."""
    if len(keep) < rows:
        index = torch.tensor(keep, device=device)
        cache.batch_select_indices(index)
        mask = mask[index]
    ids = torch.tensor(tokens, device=device).unsqueeze(1)
    return ids, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


def _mergeable(cache) -> bool:
    """Whether rows can join this cache: every layer a plain DynamicLayer (no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    return cache is not None and all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _merge(cache, other, mask: torch.Tensor, other_mask: torch.Tensor) -> torch.Tensor:
    """`other`'s rows appended to `cache`'s, layer by layer, the shorter left-padded with zeros
    (masked out); the two masks joined the same way."""
    length = max(cache.get_seq_length(), other.get_seq_length())
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
        mine.values = torch.cat([_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)])
    width = max(mask.shape[1], other_mask.shape[1])
    return torch.cat([_pad_left(mask, width, 1), _pad_left(other_mask, width, 1)])


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def prompt_logprobs(
    model, prompt: list[int], adapter: str, k: int, chunk: int = 256
) -> tuple[list[Scored | None], torch.Tensor]:
    """log p(prompt[t] | prompt[:t]) for each prompt token, with the k most likely tokens at each
    position; None for the first token, which nothing predicts. Also the logits [V] that follow the
    prompt (what a first answer token is picked from: `first_token`). One forward over the prompt
    alone; the log-softmax runs `chunk` positions at a time, so its float32 copy stays chunk x vocab."""
    device = next(model.parameters()).device
    with torch.no_grad(), adapter_arguments(model, [adapter]) as adapters:
        logits = model(input_ids=torch.tensor([prompt], device=device), **adapters).logits[0]
        entries: list[Scored | None] = [None]
        for start in range(0, logits.shape[0] - 1, chunk):
            logprobs = torch.log_softmax(logits[start : min(start + chunk, logits.shape[0] - 1)].float(), dim=-1)
            entries += [scored(row, prompt[start + 1 + t], k) for t, row in enumerate(logprobs)]
    return entries, logits[-1]


def first_token(logits: torch.Tensor, row: Row) -> tuple[int, Scored | None]:
    """A row's first answer token picked from the logits [V] after its prompt, as decode() picks it,
    with its log-probs where the row asks for them."""
    token = pick(logits, row.sampling, row.generator)
    logprobs = None if row.logprobs is None else torch.log_softmax(logits.float(), dim=-1)
    return token, None if logprobs is None else scored(logprobs, token, row.logprobs)


def _logprobs_if_asked(logits: torch.Tensor, asked: list[int | None]) -> torch.Tensor | None:
    """log softmax of the live rows' logits [rows, V] in float32, if any row asked for log-probs."""
    return torch.log_softmax(logits.float(), dim=-1) if any(k is not None for k in asked) else None


def _cache_argument(model) -> str:
    """What the model's forward calls its KV cache: `cache` from transformers 5.x, `past_key_values` before."""
    import inspect

    forward = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def adapter_groups(model, names: list[str]) -> list[list[int]]:
    """The rows (indices into `names`) that can share one forward: all of them, unless they name
    several adapters and one is DoRA's, which PEFT runs only as the active adapter (its mixed-batch
    path refuses DoRA); then one group per adapter, in order of first appearance."""
    configs = getattr(model, "peft_config", {})
    if len(set(names)) == 1 or not any(getattr(configs.get(name), "use_dora", False) for name in names):
        return [list(range(len(names)))]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return list(groups.values())


@contextlib.contextmanager
def adapter_arguments(model, names: list[str]):
    """The forward's adapter arguments for these rows. One adapter for all of them runs PEFT's
    plain path (a quarter faster per token on SmolLM2 than its mixed-batch path); mixed rows
    name theirs."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield {}
    elif len(set(names)) > 1:
        yield {"adapter_names": names}
    elif names[0] == BASE:
        with model.disable_adapter():
            yield {}
    else:
        model.set_adapter(names[0])
        yield {}
