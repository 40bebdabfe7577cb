"""sequence_logps against a float64 per-token loop written from the definition."""

from __future__ import annotations

import math

import torch

from dpo_lora.model.logprobs import IGNORE_INDEX, sequence_logps


def oracle(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    sums, counts = [], []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(1, logits.shape[1]):
            if labels[b, t] == IGNORE_INDEX:
                continue
            row = logits[b, t - 1].double()
            total += (row[labels[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))).item()
            count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def test_matches_oracle_on_random_logits_with_masked_prompt_and_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2, :2] = IGNORE_INDEX
    logps, counts = sequence_logps(logits, labels)
    expected, expected_counts = oracle(logits, labels)
    torch.testing.assert_close(logps, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == expected_counts


def test_bfloat16_logits_are_scored_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=g).bfloat16()
    labels = torch.randint(0, 9, (2, 5), generator=g)
    logps, _ = sequence_logps(logits, labels)
    assert logps.dtype == torch.float32
    expected, _ = oracle(logits.float(), labels)
    torch.testing.assert_close(logps, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_gradient_matches_log_softmax_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 8, (2, 6), generator=g)
    labels[:, :2] = IGNORE_INDEX
    sequence_logps(logits, labels)[0].sum().backward()
    plain = logits.detach().clone().requires_grad_()
    token_logps = torch.log_softmax(plain[:, :-1], -1).gather(2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (token_logps * (labels[:, 1:] != IGNORE_INDEX)).sum().backward()
    torch.testing.assert_close(logits.grad, plain.grad)


def test_token_logps_at_and_sum_by_sequence_match_the_oracle():
    from dpo_lora.model.logprobs import sum_by_sequence, token_logps_at

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 7, 11, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    labels[2, :2] = IGNORE_INDEX
    scored = labels[:, 1:] != IGNORE_INDEX
    index = (torch.arange(6)[None, :] + 7 * torch.arange(3)[:, None])[scored]  # position t predicts t + 1
    lengths = scored.sum(-1)
    logps = sum_by_sequence(token_logps_at(logits, index, labels[:, 1:][scored]), lengths)
    expected, _ = oracle(logits.detach(), labels)
    torch.testing.assert_close(logps, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-4)
    # Gradients equal the masked log_softmax definition's.
    upstream = torch.tensor([0.5, -1.0, 2.0])
    (grad,) = torch.autograd.grad((logps * upstream).sum(), logits)
    plain = logits.detach().double().requires_grad_()
    token = torch.log_softmax(plain[:, :-1], -1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    ((token * scored).sum(-1) * upstream.double()).sum().backward()
    torch.testing.assert_close(grad.double(), plain.grad, rtol=1e-5, atol=1e-6)
