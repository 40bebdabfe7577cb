"""One DPO forward on a batch: policy and reference log-probs, the loss, per-pair statistics."""

from __future__ import annotations

import torch

from dpo_lora.core.distributed import all_reduce_sum
from dpo_lora.core.schema import SMOOTHED_LOSSES, SORTED_LOSSES
from dpo_lora.data.layout import HOST, attention_bias
from dpo_lora.model import shared_attention
from dpo_lora.model.chunked_logps import scoring
from dpo_lora.model.load import reference_mode
from dpo_lora.model.logprobs import sum_by_sequence, token_logps_at
from dpo_lora.train.losses import aot_loss, dpo_loss, kto_kl, kto_loss, orpo_loss, sft_loss, simpo_loss


def forward_inputs(batch: dict, model) -> dict:
    """The model's keyword inputs for a collated batch of any layout (dpo_lora.data.layout); `model` is
    the PEFT model (its attention kernel and dtype decide how a shared prompt is masked)."""
    kernel = model.config._attn_implementation
    if "branch" in batch and kernel in shared_attention.KERNELS.values():
        # Shared prompt, split or flex attention: the rows' layout instead of a mask; the 2D mask
        # only keeps transformers from reading the restarted positions as packed sequences.
        ids = batch["input_ids"]
        plan = shared_attention.plan_for(kernel, batch[HOST].branch_lengths, ids.shape[1], ids.device)
        return {
            "input_ids": ids,
            "attention_mask": batch["attention_mask"],
            "position_ids": batch["position_ids"],
            shared_attention.PLAN_KEY: plan,
        }
    if "branch" in batch:  # shared prompt: the branch mask and restarted positions
        mask = attention_bias(batch["branch"], model.get_input_embeddings().weight.dtype)
        return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
    if "position_ids" in batch:
        # Packed: no mask, so transformers finds the sequences from the restarting positions
        # (flash_attention_2 runs its varlen kernel; sdpa/eager get a block-diagonal mask).
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def concatenated_logps(model, batch: dict, chunked_head: bool = True, ld_alpha: float = 1.0, wpo: bool = False):
    """Score chosen and rejected in one forward (any collate layout); `chunked_head=False` takes
    full logits even where the chunked head is installed (the plain path). `ld_alpha` < 1 (LD-DPO)
    weighs each pair's tokens past its shorter completion's length by it.

    Returns (completion log-probs [2B], completion lengths [2B]), chosen then rejected; with `wpo`, also
    each completion's WPO log-weight [2B] (wpo_log_weights).
    """
    peft_model = getattr(model, "module", model)
    inputs = forward_inputs(batch, peft_model)
    index, targets = batch["score_index"], batch["score_target"]
    with (
        scoring(model, index, targets, enabled=chunked_head, sum_sq=wpo) as chunked,
        shared_attention.planned(shared_attention.PLAN_KEY in inputs),
    ):
        output = model(**inputs, use_cache=False).logits
    # Chunked, the head already returned each target's log-prob ([N]); plain, it gave logits.
    scores = output if chunked else token_logps_at(output, index, targets, sum_sq=wpo)
    token_logps = scores[:, 0] if wpo else scores
    lengths, width = batch["completion_lengths"], batch[HOST].max_completion
    n = lengths.shape[0] // 2
    public = torch.minimum(lengths[:n], lengths[n:]).repeat(2) if ld_alpha != 1.0 else None
    logps = sum_by_sequence(token_logps, lengths, width, public, ld_alpha)
    if not wpo:
        return logps, lengths
    return logps, lengths, wpo_log_weights(token_logps.detach(), scores[:, 1].detach(), lengths, width)


def wpo_log_weights(token_logps, log_sum_sq, lengths, width: int | None = None) -> torch.Tensor:
    """WPO's sequence log-weight (Zhou et al., 2024, eq. 2), per completion [S], no gradient:
    `log w(x, y) = 1/|y| sum_t [log pi(y_t|x, y_<t) - log sum_v pi(v|x, y_<t)^2]`, how likely the policy
    is to sample y relative to its own sampling; token_logps and log_sum_sq [N] laid out as for
    sum_by_sequence."""
    return sum_by_sequence(token_logps - log_sum_sq, lengths, width) / lengths.clamp(min=1)


def preference_step(model, batch: dict, dpo_config, bco_delta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The mean DPO loss of a batch of B pairs and per-pair statistics ([B] tensors, detached).

    `model` is the DeepSpeed engine (or a PeftModel); its PEFT module provides the reference.
    """
    ref_logps = reference_logps(model, batch, dpo_config)
    policy = concatenated_logps(model, batch, ld_alpha=dpo_config.ld_alpha, wpo=dpo_config.wpo)
    (policy_logps, lengths), weights = policy[:2], pair_weights(policy[2]) if dpo_config.wpo else None
    return pair_losses(policy_logps, ref_logps, lengths, dpo_config, bco_delta, batch.get("label"), weights)


def pair_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight [B] from its completions' log-weights [2B] (chosen first): w(x, y_w) * w(x, y_l),
    unclipped, as TRL 1.16 weighs (earlier TRL clipped it at 1)."""
    n = log_weights.shape[0] // 2
    return torch.exp(log_weights[:n] + log_weights[n:])


def reference_logps(model, batch: dict, dpo_config) -> torch.Tensor:
    """Reference log-probs [2B] (chosen then rejected): zero, precomputed, or a no-grad forward."""
    if not dpo_config.uses_reference:  # dpo.reference_free, or only terms that read the policy alone
        return torch.zeros(batch["completion_lengths"].shape, device=batch["input_ids"].device)
    if "reference_logps" in batch:  # precomputed once (dpo_lora.train.reference)
        return batch["reference_logps"]
    # Reference first: its activations are freed before the policy's graph is built.
    with torch.no_grad(), reference_mode(getattr(model, "module", model)):
        return concatenated_logps(model, batch, ld_alpha=dpo_config.ld_alpha)[0]


def loss_term(name: str, policy_logps, ref_logps, lengths, dpo_config, bco_delta: float = 0.0, labels=None):
    """One dpo.loss term: (losses, chosen_rewards, rejected_rewards), each [B], from log-probs and
    lengths [2B], chosen first. The SFT term has no rewards of its own: DPO's implicit ones. For kto
    the "chosen" half is each row's completion and the "rejected" half its mismatched completion
    (another row's, on this row's prompt: KTO's KL sample); `labels` [B] say which rows are desirable."""
    n = policy_logps.shape[0] // 2
    chosen, rejected = (policy_logps[:n], lengths[:n]), (policy_logps[n:], lengths[n:])
    if name == "kto":
        kl = kto_kl(policy_logps[n:], ref_logps[n:], reduce=all_reduce_sum)
        losses, rewards = kto_loss(
            chosen[0], ref_logps[:n], labels, kl, beta=dpo_config.beta,
            desirable_weight=dpo_config.kto_desirable_weight, undesirable_weight=dpo_config.kto_undesirable_weight,
        )  # fmt: skip
        return losses, rewards, dpo_config.beta * (policy_logps[n:] - ref_logps[n:]).detach()
    if name == "simpo":
        return simpo_loss(
            chosen[0], rejected[0], chosen[1], rejected[1], beta=dpo_config.beta, gamma=dpo_config.simpo_gamma
        )
    if name == "orpo":
        return orpo_loss(chosen[0], rejected[0], chosen[1], rejected[1], lam=dpo_config.orpo_lambda)
    if name in SORTED_LOSSES:
        return aot_loss(
            chosen[0], rejected[0], ref_logps[:n], ref_logps[n:], beta=dpo_config.beta,
            paired=name == "aot", label_smoothing=dpo_config.label_smoothing,
        )  # fmt: skip
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen[0],
        rejected[0],
        ref_logps[:n],
        ref_logps[n:],
        beta=dpo_config.beta,
        loss_type="sigmoid" if name == "sft" else name,
        label_smoothing=dpo_config.label_smoothing if name in SMOOTHED_LOSSES else 0.0,
        chosen_lengths=chosen[1],
        rejected_lengths=rejected[1],
        bco_delta=bco_delta,
        dpop_lambda=dpo_config.dpop_lambda,
        discopop_tau=dpo_config.discopop_tau,
        divergence=dpo_config.f_divergence,
        divergence_alpha=dpo_config.f_alpha,
    )
    return (sft_loss(*chosen) if name == "sft" else losses), chosen_rewards, rejected_rewards


def pair_losses(
    policy_logps, ref_logps, lengths, dpo_config, bco_delta: float = 0.0, labels=None, weights=None
) -> tuple[torch.Tensor, dict]:
    """The mean loss (dpo.loss's terms, weighted) and per-pair statistics ([B]) from log-probs and
    lengths [2B], chosen first; the rewards are the first term's, and a mixture logs each term
    as `loss/NAME`. `weights` [B] (WPO's, detached) scale each pair's loss, logged as `wpo/weight`."""
    n = policy_logps.shape[0] // 2
    terms = {}
    for name, weight in dpo_config.terms:
        terms[name] = (weight, *loss_term(name, policy_logps, ref_logps, lengths, dpo_config, bco_delta, labels))
    losses = sum(weight * term_losses for weight, term_losses, _, _ in terms.values())
    if weights is not None:
        losses = losses * weights
    _, _, chosen_rewards, rejected_rewards = next(iter(terms.values()))
    stats = {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_logps[:n].detach(),
        "logps/rejected": policy_logps[n:].detach(),
    }
    if len(terms) > 1:
        stats |= {f"loss/{name}": term_losses.detach() for name, (_, term_losses, _, _) in terms.items()}
    if weights is not None:
        stats["wpo/weight"] = weights
    return losses.mean(), stats | health_stats(policy_logps, ref_logps, lengths, stats["rewards/margins"])


def health_stats(policy_logps, ref_logps, lengths, margins) -> dict:
    """Per-pair statistics [B] for the health monitors: completion lengths, the chosen log-ratio to
    the reference per token, and the moments of the margin and the chosen-minus-rejected length
    (from which a window's correlation follows: dpo_lora.train.metrics.margin_length_correlation)."""
    n = policy_logps.shape[0] // 2
    chosen, rejected = lengths[:n].to(policy_logps.dtype), lengths[n:].to(policy_logps.dtype)
    difference, margins = (chosen - rejected).double(), margins.double()  # moments: float64
    return {
        "lengths/chosen": chosen,
        "lengths/rejected": rejected,
        "logratios/chosen_per_token": (policy_logps[:n] - ref_logps[:n]).detach() / chosen.clamp(min=1),
        "moments/margin_x_length": margins * difference,
        "moments/margin_sq": margins**2,
        "moments/length_sq": difference**2,
    }
