"""preference_step: one batch through policy and reference."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_lora.core.schema import DpoConfig, LoraConfig, ModelConfig
from dpo_lora.data.layout import collate_pairs
from dpo_lora.model import shared_attention
from dpo_lora.model.load import attach_adapter, load_base
from dpo_lora.model.logprobs import sum_by_sequence
from dpo_lora.train.step import forward_inputs, preference_step


def batch_of(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    features = [{"prompt_ids": ids(4), "chosen_ids": ids(3), "rejected_ids": ids(5)} for _ in range(3)]
    return collate_pairs(features, pad_token_id=0)


def fresh_policy(model_dir):
    torch.manual_seed(0)
    return attach_adapter(
        load_base(ModelConfig(path=str(model_dir), dtype="float32"), torch.device("cpu")), LoraConfig(dropout=0.0)
    )


def test_fresh_adapter_gives_log2_and_zero_rewards(tiny_model_dir):
    model = fresh_policy(tiny_model_dir)
    loss, stats = preference_step(model, batch_of(model.config.vocab_size), DpoConfig(beta=0.1))
    assert loss.item() == math.log(2) or abs(loss.item() - math.log(2)) < 1e-6
    assert all(v.shape == (3,) for v in stats.values())
    assert torch.all(stats["rewards/chosen"] == 0) and torch.all(stats["rewards/accuracies"] == 0)
    assert loss.requires_grad and not stats["loss"].requires_grad


def test_reference_free_runs_one_forward_and_ignores_the_reference(tiny_model_dir):
    model = fresh_policy(tiny_model_dir)
    calls = []
    model.base_model.model.register_forward_hook(lambda *_: calls.append(1))
    batch = batch_of(model.config.vocab_size)
    _, stats = preference_step(model, batch, DpoConfig(beta=0.1, reference_free=True))
    assert len(calls) == 1
    torch.testing.assert_close(stats["rewards/chosen"], 0.1 * stats["logps/chosen"])
    calls.clear()
    preference_step(model, batch, DpoConfig(beta=0.1))
    assert len(calls) == 2


def test_policy_only_methods_run_no_reference_forward(tiny_model_dir):
    model = fresh_policy(tiny_model_dir)
    calls = []
    model.base_model.model.register_forward_hook(lambda *_: calls.append(1))
    batch = batch_of(model.config.vocab_size)
    for loss in ("simpo", "orpo", ["sft"], ["simpo", "sft"]):
        calls.clear()
        _, stats = preference_step(model, batch, DpoConfig(beta=2.0, loss=loss))
        assert len(calls) == 1, loss
    calls.clear()
    preference_step(model, batch, DpoConfig(loss=["sigmoid", "sft"]))  # DPO's term reads the reference
    assert len(calls) == 2


def test_a_mixture_is_the_weighted_sum_of_its_terms_each_logged(tiny_model_dir):
    """[sigmoid, sft] (RPO): DPO's loss plus the weighted chosen NLL per token; the rewards are DPO's."""
    model = fresh_policy(tiny_model_dir)
    with torch.no_grad():  # move the adapter off zero, so that policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    batch = batch_of(model.config.vocab_size)
    loss, stats = preference_step(model, batch, DpoConfig(beta=0.1, loss=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))
    _, dpo = preference_step(model, batch, DpoConfig(beta=0.1))
    nll = -stats["logps/chosen"] / batch["completion_lengths"][:3]
    torch.testing.assert_close(stats["loss/sigmoid"], dpo["loss"])
    torch.testing.assert_close(stats["loss/sft"], nll)
    torch.testing.assert_close(stats["loss"], dpo["loss"] + 0.5 * nll)
    torch.testing.assert_close(loss.detach(), (dpo["loss"] + 0.5 * nll).mean())
    torch.testing.assert_close(stats["rewards/margins"], dpo["rewards/margins"])
    assert not torch.all(dpo["rewards/margins"] == 0)
    assert "loss/sigmoid" not in dpo  # one term: the metrics rows stay as they were


class HostReads(TorchDispatchMode):
    """Counts the host's reads of a tensor's value (`.item()`, `int()`, `bool()`, `.tolist()` on a
    device): on a GPU each one waits until the device has run everything queued before it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_a_shared_prompt_step_reads_nothing_back_from_the_device(tiny_model_dir):
    """Reference forward, policy forward, loss and backward in the default layout (shared prompt,
    split attention): the lengths come from the collate as Python ints, and transformers builds
    no mask it would have to inspect."""
    model = fresh_policy(tiny_model_dir)
    shared_attention.use_on(model)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    features = [{"prompt_ids": ids(4 + i), "chosen_ids": ids(3), "rejected_ids": ids(5 - i)} for i in range(3)]
    batch = collate_pairs(features, pad_token_id=0, share_prompt=True)
    forward_inputs(batch, model)  # the plan's masks are tensor subclasses: made outside the mode, as training does
    with HostReads() as reads:
        loss, stats = preference_step(model, batch, DpoConfig(beta=0.1))
        loss.backward()
    assert reads.count == 0
    token_logps = torch.ones(sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features))
    with HostReads() as reads:  # the counter sees what the step used to do
        sum_by_sequence(token_logps, batch["completion_lengths"])
    assert reads.count == 1


def test_ld_dpo_weighs_each_pairs_tokens_past_its_shorter_completion(tiny_model_dir):
    """`dpo.ld_alpha` (LD-DPO): each sequence's log-prob is its first l tokens' plus alpha times the
    rest's, l the shorter completion of its pair; against an oracle that runs every prompt +
    completion alone through the model and sums its tokens' float64 log-softmax by hand."""
    from dpo_lora.train.step import concatenated_logps

    model = fresh_policy(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    features = [
        {"prompt_ids": ids(4), "chosen_ids": ids(c), "rejected_ids": ids(r)} for c, r in ((2, 5), (6, 3), (4, 4))
    ]
    batch = collate_pairs(features, pad_token_id=0)
    alpha = 0.25
    with torch.no_grad():
        weighted, lengths = concatenated_logps(model, batch, ld_alpha=alpha)
        plain, _ = concatenated_logps(model, batch)
        expected = []
        for side in ("chosen_ids", "rejected_ids"):
            for f in features:
                public = min(len(f["chosen_ids"]), len(f["rejected_ids"]))
                logits = model(input_ids=torch.tensor([f["prompt_ids"] + f[side]])).logits[0].double()
                token = [
                    torch.log_softmax(logits[len(f["prompt_ids"]) + t - 1], -1)[tok] for t, tok in enumerate(f[side])
                ]
                expected.append(sum(token[:public]) + alpha * sum(token[public:]))
    assert lengths.tolist() == [2, 6, 4, 5, 3, 4]
    torch.testing.assert_close(weighted.double(), torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert (weighted - plain).abs()[[1, 3]].min() > 1e-3 and torch.equal(weighted[[2, 5]], plain[[2, 5]])


def test_wpo_weighs_each_pair_by_its_completions_sampling_probability_on_both_paths(tiny_model_dir):
    """`dpo.wpo` (Zhou et al. 2024, eq. 2): each pair's loss times w(y_w) w(y_l), with
    log w(y) = mean_t [log p(y_t) - log sum_v p(v)^2] under the policy, no gradient through w. The
    weights against an oracle that runs every prompt + completion alone and reduces its float64
    softmax by hand; the loss and LoRA gradients against DPO's per-pair losses times those weights;
    the chunked head against plain logits."""
    from dpo_lora.model import chunked_logps
    from dpo_lora.train.losses import dpo_loss
    from dpo_lora.train.step import concatenated_logps, reference_logps

    model = fresh_policy(tiny_model_dir)
    with torch.no_grad():  # a trained-looking adapter: policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    features = [{"prompt_ids": ids(4), "chosen_ids": ids(c), "rejected_ids": ids(r)} for c, r in ((2, 5), (6, 3))]
    batch = collate_pairs(features, pad_token_id=0)
    with torch.no_grad():
        log_w = []
        for side in ("chosen_ids", "rejected_ids"):
            for f in features:
                logits = model(input_ids=torch.tensor([f["prompt_ids"] + f[side]])).logits[0].double()
                at = [torch.log_softmax(logits[len(f["prompt_ids"]) + t - 1], -1) for t in range(len(f[side]))]
                terms = [lp[tok] - torch.logsumexp(2 * lp, -1) for lp, tok in zip(at, f[side], strict=True)]
                log_w.append(sum(terms) / len(terms))
        expected_weights = torch.exp(torch.stack(log_w[:2]) + torch.stack(log_w[2:]))
    config = DpoConfig(beta=0.5, wpo=True)

    def run():
        model.zero_grad()
        loss, stats = preference_step(model, batch, config)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        policy_logps, _ = concatenated_logps(model, batch)
        ref = reference_logps(model, batch, config)
        plain = dpo_loss(policy_logps[:2], policy_logps[2:], ref[:2], ref[2:], beta=0.5)[0]
        (stats["wpo/weight"] * plain).mean().backward()
        unweighted = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), stats, grads, unweighted, plain.detach()

    results = {"plain": run()}
    assert chunked_logps.install(model, chunk_size=3)
    results["chunked"] = run()
    for path, (loss, stats, grads, unweighted, plain) in results.items():
        torch.testing.assert_close(stats["wpo/weight"].double(), expected_weights, rtol=1e-5, atol=0, msg=path)
        torch.testing.assert_close(loss, (expected_weights.float() * plain).mean(), rtol=1e-5, atol=1e-7, msg=path)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, unweighted[name], rtol=1e-5, atol=1e-8, msg=f"{path} {name}")
    assert (expected_weights - 1).abs().min() > 1e-3  # the weights are not a no-op here
    torch.testing.assert_close(results["chunked"][1]["wpo/weight"], results["plain"][1]["wpo/weight"])
