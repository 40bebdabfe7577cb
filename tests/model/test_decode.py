"""The server's batched decoding loop against transformers' generate() and a float64 sampler."""

from __future__ import annotations

import pytest
import torch

from dpo_lora.model.decode import BASE, Row, Sampling, decode, first_token, pick, prompt_logprobs

from ..conftest import build_tiny_model

VOCAB = 64


@pytest.fixture(scope="module")
def two_adapters():
    """A tiny Llama with a sharpened head (clear argmaxes, so greedy paths do not hinge on the
    last bit) and two random LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(VOCAB, seed=3)
    with torch.no_grad():
        base.lm_head.weight.mul_(40)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["k_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model.eval()


def reference_greedy(model, prompt: list[int], adapter: str, max_tokens: int, eos: int) -> list[int]:
    """transformers' greedy generate() on one prompt alone, with the adapter set the plain way."""
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    if adapter == BASE:
        with model.disable_adapter():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    else:
        model.set_adapter(adapter)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, len(prompt) :].tolist()


def run(model, rows, eos=63, stop=None, scores=None):
    got = [[] for _ in rows]

    def on_token(i, token, scored):
        got[i].append(token)
        if scores is not None:
            scores[i].append(scored)
        return stop is None or not stop(i, got[i])

    decode(model, rows, {eos}, pad_id=0, on_token=on_token)
    return got


def test_a_mixed_batch_decodes_each_row_as_generate_does_alone(two_adapters):
    prompts = [[5, 9, 12, 3, 7, 30], [8, 2], [17, 4, 4, 11], [40, 41, 42]]
    adapters = ["a", "b", BASE, "a"]
    lengths = [12, 5, 9, 1]
    rows = [
        Row(p, Sampling(temperature=0, max_tokens=n), a) for p, a, n in zip(prompts, adapters, lengths, strict=True)
    ]
    got = run(two_adapters, rows)
    for prompt, adapter, n, tokens in zip(prompts, adapters, lengths, got, strict=True):
        want = reference_greedy(two_adapters, prompt, adapter, n, eos=63)
        assert tokens == want, f"adapter {adapter}"
    assert [len(t) for t in got] == lengths, "each row stops at its own max_tokens"
    assert len({tuple(t) for t in got[:2]}) == 2


@pytest.fixture(scope="module")
def with_dora():
    """A LoRA adapter "a" and a DoRA adapter "d" (random B and magnitudes: not the identity)."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(VOCAB, seed=3)
    with torch.no_grad():
        base.lm_head.weight.mul_(40)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name="a")
    model.add_adapter("d", LoraConfig(r=2, target_modules=["k_proj", "up_proj", "o_proj"], use_dora=True))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3) if "magnitude" not in name else p.mul_(torch.rand_like(p) + 0.5)
    return model.eval()


def test_rows_of_a_dora_adapter_decode_apart_each_as_generate_does_alone(with_dora):
    """PEFT refuses DoRA in a mixed-adapter forward: decode runs each adapter's rows in turn, and
    every row still gets its own tokens, in its own slot of the callback."""
    from dpo_lora.model.decode import adapter_groups

    adapters = ["d", "a", BASE, "d"]
    assert adapter_groups(with_dora, adapters) == [[0, 3], [1], [2]]
    assert adapter_groups(with_dora, ["d", "d"]) == [[0, 1]]
    assert adapter_groups(with_dora, ["a", BASE]) == [[0, 1]], "plain LoRA rows share one forward"
    prompts = [[5, 9, 12, 3, 7, 30], [8, 2], [17, 4, 4, 11], [40, 41, 42]]
    lengths = [7, 5, 6, 4]
    rows = [Row(p, Sampling(temperature=0, max_tokens=n), a) for p, a, n in zip(prompts, adapters, lengths, strict=True)]  # fmt: skip
    got = run(with_dora, rows)
    for prompt, adapter, n, tokens in zip(prompts, adapters, lengths, got, strict=True):
        assert tokens == reference_greedy(with_dora, prompt, adapter, n, eos=63), f"adapter {adapter}"
    assert got[0] != reference_greedy(with_dora, prompts[0], BASE, 7, eos=63), "DoRA changes the answer here"


def test_rows_admitted_mid_decode_get_what_generate_gives_them_alone(two_adapters):
    """Continuous batching: rows joining after 2 and 5 steps, with prompts shorter and longer than
    the running rows' (their caches left-padded to the longer) and other adapters, each decode as
    alone; every row is done once, as it ends, not when the batch does."""
    first = [Row([5, 9, 12, 3, 7, 30], Sampling(temperature=0, max_tokens=12), "a"), Row([8, 2], Sampling(temperature=0, max_tokens=3), "b")]  # fmt: skip
    later = {2: [Row([17, 4, 4, 11, 6, 6, 6, 6, 6, 6, 6], Sampling(temperature=0, max_tokens=6), BASE)],
             5: [Row([40, 41], Sampling(temperature=0, max_tokens=4), "b"), Row([1, 2, 3], Sampling(temperature=0, max_tokens=0), "a")]}  # fmt: skip
    calls, got, events = [0], {}, []

    def admit():
        calls[0] += 1
        return later.get(calls[0], [])

    def on_token(i, token, scored):
        got.setdefault(i, []).append(token)
        events.append(("token", i))
        return True

    decode(two_adapters, first, {63}, pad_id=0, on_token=on_token, on_done=lambda i: events.append(("done", i)), admit=admit)  # fmt: skip
    rows = first + later[2] + later[5]
    for i, row in enumerate(rows):
        want = reference_greedy(two_adapters, row.prompt, row.adapter, row.sampling.max_tokens, eos=63) if row.sampling.max_tokens else []  # fmt: skip
        assert got.get(i, []) == want, f"row {i} ({row.adapter})"
    assert sorted(i for kind, i in events if kind == "done") == [0, 1, 2, 3, 4], "each row done once"
    done_at = {i: events.index(("done", i)) for i in range(5)}
    last_token = {i: max(k for k, e in enumerate(events) if e == ("token", i)) for i in got}
    assert all(done_at[i] > last_token[i] for i in got), "done after a row's last token"
    assert done_at[1] < last_token[0], "the short row is done while the long one decodes"
    assert ("token", 2) in events[: last_token[0]], "the row admitted at step 2 decoded beside the first"


def test_eos_and_the_callback_end_a_row_and_the_others_go_on(two_adapters):
    rows = [Row([5, 9, 12], Sampling(temperature=0, max_tokens=10), "a") for _ in range(3)]
    free = run(two_adapters, rows[:1])[0]
    at = next(k for k in range(3, len(free)) if free[k] not in free[:k])
    eos = free[at]  # a later token that did not come before: pretend it is the EOS
    got = run(two_adapters, rows, eos=eos, stop=lambda i, tokens: i == 1 and len(tokens) == 2)
    assert got[0] == free[: at + 1], "the EOS is passed on, then the row ends"
    assert got[1] == free[:2], "the callback ends its row"
    assert got[2] == got[0]


def test_a_seeded_row_samples_the_same_whatever_else_is_in_the_batch(two_adapters):
    def seeded(adapter):
        return Row(
            [3, 14, 15], Sampling(temperature=1.0, top_p=0.9, max_tokens=8), adapter, torch.Generator().manual_seed(7)
        )

    alone = run(two_adapters, [seeded("b")])[0]
    crowded = run(two_adapters, [Row([1, 2, 3, 4, 5, 6, 7], Sampling(temperature=1.0, max_tokens=8), "a"), seeded("b")])
    assert crowded[1] == alone
    other = run(two_adapters, [Row([3, 14, 15], Sampling(1.0, 0.9, 8), "b", torch.Generator().manual_seed(8))])[0]
    assert other != alone, "another seed, another sample"


def test_pick_samples_softmax_over_temperature_and_cuts_at_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    draws = 20000
    generator = torch.Generator().manual_seed(0)

    def frequencies(sampling):
        counts = torch.zeros(5, dtype=torch.float64)
        for _ in range(draws):
            counts[pick(logits, sampling, generator)] += 1
        return counts / draws

    t = 0.7
    oracle = torch.softmax(logits.double() / t, 0)
    assert torch.allclose(frequencies(Sampling(t, 1.0)), oracle, atol=0.015)
    # top_p 0.95 at t=0.7: 0.700 + 0.168 + 0.082 = 0.950..., so the three most likely tokens stay
    # (the third is needed to reach 0.95) and the last two go.
    kept = oracle[:3] / oracle[:3].sum()
    nucleus = frequencies(Sampling(t, 0.95))
    assert torch.allclose(nucleus[:3], kept, atol=0.015) and nucleus[3:].sum() == 0
    assert frequencies(Sampling(t, 0.8))[2:].sum() == 0, "0.700 + 0.168 already reach 0.8"
    assert pick(logits, Sampling(1.0, 1e-6), generator) == 0, "a tiny top_p keeps only the argmax"
    assert pick(torch.tensor([0.0, 3.0, 1.0]), Sampling(0.0), None) == 1


def oracle_logprobs(model, tokens: list[int], adapter: str) -> torch.Tensor:
    """log p(tokens[t] | tokens[:t]) at every position [T-1, V], in float64: one forward over the whole
    sequence by a float64 copy of the model, no cache, no padding, the adapter set the plain way."""
    import copy

    double = copy.deepcopy(model).double()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        if adapter == BASE:
            with double.disable_adapter():
                logits = double(input_ids=ids).logits[0, :-1]
        else:
            double.set_adapter(adapter)
            logits = double(input_ids=ids).logits[0, :-1]
    return torch.log_softmax(logits, dim=-1)


def assert_scored_like(entry, oracle_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token == token
    assert abs(entry.logprob - float(oracle_row[token])) < 1e-4
    values, ids = oracle_row.topk(k)
    assert [t for t, _ in entry.top] == ids.tolist(), "the k most likely, most likely first"
    assert torch.allclose(torch.tensor([lp for _, lp in entry.top], dtype=torch.float64), values, atol=1e-4)


def test_each_tokens_logprob_is_the_models_own_as_a_float64_forward_over_prompt_and_answer_gives(two_adapters):
    prompts = [[5, 9, 12, 3, 7, 30], [8, 2], [17, 4, 4, 11]]
    adapters = ["a", "b", BASE]
    rows = [
        Row(prompts[0], Sampling(temperature=0, max_tokens=6), "a", None, 3),
        Row(prompts[1], Sampling(temperature=1.5, top_p=0.9, max_tokens=5), "b", torch.Generator().manual_seed(4), 2),
        Row(prompts[2], Sampling(temperature=0, max_tokens=4), BASE),  # asks for none
        Row([1, 2, 3], Sampling(temperature=0, max_tokens=0), "a", None, 1),  # asks for no token at all
    ]
    scores = [[] for _ in rows]
    got = run(two_adapters, rows, scores=scores)
    assert got[3] == [] and scores[2] == [None] * len(got[2])
    for row, adapter, tokens, entries in zip(rows[:2], adapters, got, scores, strict=False):
        oracle = oracle_logprobs(two_adapters, row.prompt + tokens, adapter)
        for k, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
            # temperature and top_p change which token is picked, not the log-probs reported
            assert_scored_like(entry, oracle[len(row.prompt) + k - 1], token, row.logprobs)
    assert all(e.logprob == e.top[0][1] for e in scores[0]), "greedy picks the most likely token"


def test_a_prompts_logprobs_are_the_float64_forwards_and_its_first_token_has_none(two_adapters):
    prompt = [5, 9, 12, 3, 7, 30, 2, 2, 41]
    for adapter in ("a", BASE):
        entries, _ = prompt_logprobs(two_adapters, prompt, adapter, k=4, chunk=3)  # chunks of 3 positions: 3 chunks
        oracle = oracle_logprobs(two_adapters, prompt, adapter)
        assert entries[0] is None and len(entries) == len(prompt)
        for t in range(1, len(prompt)):
            assert_scored_like(entries[t], oracle[t - 1], prompt[t], 4)
    a, base = (prompt_logprobs(two_adapters, prompt, name, k=0)[0] for name in ("a", BASE))
    assert a[1].top == () and abs(a[-1].logprob - base[-1].logprob) > 1e-3, "the adapter changes the scores"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_first_token_from_the_prompts_own_logits_is_the_one_decode_picks(two_adapters, temperature):
    """The engine's shortcut for one-token answers to echoed prompts (lm-eval's ask): the token and
    its log-probs from prompt_logprobs' last logits, against decode()'s prefill of the same row."""
    prompt = [5, 9, 12, 3, 7, 30]

    def row():
        return Row(prompt, Sampling(temperature=temperature, max_tokens=1), "a", torch.Generator().manual_seed(3), 3)

    scores = [[]]
    (plain,) = run(two_adapters, [row()], scores=scores)
    token, entry = first_token(prompt_logprobs(two_adapters, prompt, "a", k=3)[1], row())
    assert [token] == plain and entry.token == scores[0][0].token
    assert abs(entry.logprob - scores[0][0].logprob) < 1e-5
    assert [t for t, _ in entry.top] == [t for t, _ in scores[0][0].top]
