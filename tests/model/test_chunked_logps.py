"""The chunked LM-head scoring equals the plain full-logits path: values and gradients."""

from __future__ import annotations

import pytest
import torch

from dpo_lora.model import chunked_logps
from dpo_lora.model.logprobs import IGNORE_INDEX, sequence_logps
from dpo_lora.train.step import concatenated_logps


def oracle(hidden, weight, bias, labels):
    """float64, written from the definition: log softmax(h W^T + b)[label] at each scored position."""
    logits = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
    return (token * mask).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["head-trained", "head-frozen"])
def test_values_and_gradients_match_a_float64_oracle(chunk_size, with_bias, frozen_head):
    """A frozen head takes the gradient-in-forward path, a trained one the recomputing backward."""
    g = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(3, 6, 5, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(13, 5, generator=g).requires_grad_(not frozen_head)
    bias = torch.randn(13, generator=g).requires_grad_(not frozen_head) if with_bias else None
    labels = torch.randint(0, 13, (3, 6), generator=g)
    labels[0, :2] = IGNORE_INDEX  # prompt
    labels[2, 4:] = IGNORE_INDEX  # padding
    upstream = torch.randn(3, generator=g)

    mask = labels[:, 1:] != IGNORE_INDEX  # position t predicts labels[t + 1]
    index = (torch.arange(6)[None, :-1] + 6 * torch.arange(3)[:, None])[mask]
    token_logps = chunked_logps.label_logps_at(hidden, weight, bias, index, labels[:, 1:][mask], chunk_size)
    got = torch.zeros(mask.shape).masked_scatter(mask, token_logps).sum(-1)
    inputs = [hidden] if frozen_head else [hidden, weight] + ([bias] if with_bias else [])
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    head = [t.detach().double() for t in (weight, bias) if t is not None] if frozen_head else leaves[1:]
    expected = oracle(leaves[0], head[0], head[1] if with_bias else None, labels)
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), leaves)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, expected_grads, strict=False):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_in_forward_equals_the_recomputing_backward(dtype):
    """The fast path (frozen head) against the recomputing one on the same inputs, including
    confident tokens whose 1 - p is tiny: values bitwise; hidden-state gradients to rounding in
    float32, and in bf16 (rounded at different points) no further from a float64 oracle."""
    g = torch.Generator().manual_seed(7)
    hidden = (torch.randn(40, 16, generator=g) * 3).to(dtype)
    weight = torch.randn(50, 16, generator=g).to(dtype)
    labels = (hidden.float() @ weight.float().T).argmax(1)  # mostly confident: 1 - p near 0
    labels[::3] = torch.randint(0, 50, (14,), generator=g)
    upstream = torch.randn(40, generator=g)
    exact = hidden.double().requires_grad_()
    oracle_logps = torch.log_softmax(exact @ weight.double().T, 1).gather(1, labels[:, None]).squeeze(1)
    (oracle_grad,) = torch.autograd.grad((oracle_logps * upstream.double()).sum(), [exact])
    results = []
    for weight_needs_grad in (True, False):  # True forces the recomputing backward
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_needs_grad)
        out = chunked_logps.label_logps_at(h[None], w, None, torch.arange(40), labels, chunk_size=16)
        (grad,) = torch.autograd.grad((out * upstream).sum(), [h])
        results.append((out, grad, float((grad.double() - oracle_grad).norm() / oracle_grad.norm())))
    (recomputed, recomputed_grad, recomputed_error), (fast, fast_grad, fast_error) = results
    assert torch.equal(fast, recomputed)
    if dtype == torch.float32:
        torch.testing.assert_close(fast_grad, recomputed_grad, rtol=1e-5, atol=1e-6)
        assert fast_error < 1e-6
    else:
        assert 0 < fast_error <= 1.25 * recomputed_error, (fast_error, recomputed_error)


def test_the_gradient_is_formed_in_the_forward_only_when_hidden_needs_one(monkeypatch):
    """The reference pass (no_grad) and a trained head skip the gradient-in-forward work; a
    frozen head with grad enabled does it."""
    calls = []
    fast = chunked_logps._label_logps_and_direction
    monkeypatch.setattr(chunked_logps, "_label_logps_and_direction", lambda *a: calls.append(1) or fast(*a))
    hidden = torch.randn(1, 4, 3, requires_grad=True)

    def score(weight):
        return chunked_logps.label_logps_at(hidden, weight, None, torch.arange(4), torch.arange(4), 2)

    with torch.no_grad():
        assert score(torch.randn(7, 3)).grad_fn is None
    score(torch.randn(7, 3, requires_grad=True)).sum().backward()
    assert calls == []
    score(torch.randn(7, 3)).sum().backward()
    assert len(calls) == 2  # two chunks of 2


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_the_model_it_equals_plain_logits_in_values_and_lora_gradients(tiny_model_dir, tiny_tokenizer, dtype):
    from dpo_lora.core.schema import LoraConfig, ModelConfig
    from dpo_lora.data.layout import collate_pairs
    from dpo_lora.model.load import attach_adapter, load_base

    torch.manual_seed(0)
    model = attach_adapter(
        load_base(ModelConfig(path=str(tiny_model_dir), quantization="nf4", dtype=dtype), torch.device("cpu")),
        LoraConfig(dropout=0.0),
    )
    for name, p in model.named_parameters():  # a trained-looking adapter, so every path carries signal
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    pairs = [
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13]},
        {"prompt_ids": [14, 15], "chosen_ids": [16, 17, 18, 19, 20], "rejected_ids": [21, 22, 23]},
    ]
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)

    def run():
        model.zero_grad()
        logps, lengths = concatenated_logps(model, batch)
        (logps * torch.linspace(-1, 1, logps.shape[0])).sum().backward()
        return logps.detach(), lengths, lora_grads(model)

    plain = run()
    assert chunked_logps.install(model, chunk_size=4)
    chunked = run()
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked[1], plain[1])
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    for name, grad in plain[2].items():
        torch.testing.assert_close(chunked[2][name], grad, rtol=tolerance, atol=tolerance * 1e-1, msg=name)
    with chunked_logps.scoring(model, batch["score_index"], batch["score_target"]):
        pass
    # Outside scoring the head is the plain head again: generation and eval see logits.
    logits = model(input_ids=batch["input_ids"]).logits
    assert logits.shape[-1] == model.get_output_embeddings().weight.shape[0]
    labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX)
    labels.view(-1)[batch["score_index"] + 1] = batch["score_target"]  # each target follows its position
    assert torch.allclose(sequence_logps(logits, labels)[0], plain[0], atol=1e-4)


def test_a_head_that_chunking_would_change_is_left_alone():
    class Scaled(torch.nn.Module):
        config = type("C", (), {"final_logit_softcapping": 30.0})()

        def get_output_embeddings(self):
            return torch.nn.Linear(4, 8)

    assert not chunked_logps.install(Scaled(), chunk_size=16)


@pytest.mark.parametrize("path", ["chunked-head-frozen", "chunked-head-trained", "plain"])
def test_log_sum_sq_matches_a_float64_oracle_and_leaves_the_log_probs_and_their_gradients_alone(path):
    """WPO's second reduction, log sum_v p_v^2 at each scored position, from the chunked head (both
    backward paths) and from plain logits, against float64; asking for it changes neither the log-probs
    nor their gradients (bitwise), and it carries no gradient of its own."""
    from dpo_lora.model.logprobs import token_logps_at

    g = torch.Generator().manual_seed(11)
    hidden = (torch.randn(2, 9, 6, generator=g) * 2).requires_grad_()
    weight = (torch.randn(17, 6, generator=g) * 2).requires_grad_(path == "chunked-head-trained")
    index = torch.tensor([0, 3, 4, 8, 10, 11, 15])
    targets = torch.randint(0, 17, (7,), generator=g)

    def score(sum_sq: bool):
        if path == "plain":
            return token_logps_at(hidden @ weight.T, index, targets, sum_sq=sum_sq)
        out = chunked_logps.label_logps_at(hidden, weight, None, index, targets, chunk_size=3, sum_sq=sum_sq)
        return torch.stack(out, 1) if sum_sq else out

    inputs = [hidden] + ([weight] if weight.requires_grad else [])
    alone = score(False)
    alone_grads = torch.autograd.grad(alone.sum(), inputs)
    both = score(True)
    assert both.shape == (7, 2)
    both_grads = torch.autograd.grad(both[:, 0].sum(), inputs, retain_graph=True)
    assert torch.equal(both[:, 0].detach(), alone.detach())
    for a, b in zip(both_grads, alone_grads, strict=True):
        assert torch.equal(a, b)
    assert not torch.autograd.grad(both[:, 1].sum(), inputs, allow_unused=True, materialize_grads=True)[0].any()
    probs = torch.softmax((hidden.detach().double() @ weight.detach().double().T).flatten(0, 1)[index], -1)
    torch.testing.assert_close(both[:, 1].double(), (probs**2).sum(-1).log(), rtol=1e-5, atol=1e-5)
