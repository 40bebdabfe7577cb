"""Preference losses as pure functions: tensors in, tensors out; no model, no I/O.

Notation, per example: the policy/reference log-ratio of the chosen completion
`c = log pi(y_w|x) - log ref(y_w|x)`, of the rejected one `r = log pi(y_l|x) - log ref(y_l|x)`,
and their difference `h = c - r`. DPO's implicit rewards are `beta * c` and `beta * r`.
`|y|` is a completion's token count; `avg(y) = log pi(y|x) / |y|` its per-token log-prob.

`dpo_loss` holds the losses on the log-ratios (DPO's family, DPO-Positive among them); `aot_loss`
compares them across the batch, sorted; `sft_loss`, `simpo_loss` and `orpo_loss` read the policy alone
(no reference model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def divergence_scores(logratios: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f-DPO's scores (Wang et al., 2023, Table 1): `f'(u) - f'(1)` with `u = pi(y|x) / ref(y|x)`, from
    `log u`; the difference of two is what DPO's family compares (its `log Z(x)` cancels only there).

    reverse_kl `f'(u) = log u + 1` (DPO: the score is the log-ratio); forward_kl `f'(u) = -1/u`;
    js_divergence `f'(u) = log(2u / (1 + u))`; alpha_divergence `f'(u) = (u^(alpha - 1) - 1) / (alpha - 1)`,
    TRL's parametrization (the paper's alpha is 1 - this one; they agree at 0.5; alpha -> 1 is reverse KL).
    Exponents are clamped at 80 (float32's exp stays finite), as TRL clamps them.
    """
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if divergence == "forward_kl":
        return -torch.expm1(torch.clamp(-logratios, max=80.0))
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        return torch.expm1(torch.clamp((alpha - 1) * logratios, max=80.0)) / (alpha - 1)
    raise ValueError(f"unknown f-divergence {divergence!r}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reference_free: bool = False,
    bco_delta: float | torch.Tensor = 0.0,
    dpop_lambda: float = 0.0,
    discopop_tau: float = 0.05,
    divergence: str = "reverse_kl",
    divergence_alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference loss and the detached implicit rewards.

    All log-prob inputs have shape [B] and are sums over completion tokens.
    `chosen_lengths`/`rejected_lengths` ([B], completion token counts) are needed by `ipo`,
    which compares per-token average log-probs. `bco_delta` is BCO's reward baseline (a
    running mean of rewards kept by the caller). `dpop_lambda` weighs DPO-Positive's penalty
    (Pal et al., 2024, eq. 3) on the chosen completion falling below the reference:
    `dpop = -log sigmoid(beta * (h - dpop_lambda * max(0, log ref(y_w|x) - log pi(y_w|x))))`.
    `discopop` (Lu et al., 2024, eq. 5) blends DPO's logistic loss and an exponential one by the
    log-ratio itself: with `rho = beta * h` and `m = sigmoid(rho / discopop_tau)`,
    `(1 - m) * -log sigmoid(rho) + m * exp(-rho)`. `sigmoid_norm` is DPO on per-token averages
    (`c / |y_w|`, `r / |y_l|`), as `ipo` compares them; both report per-token rewards.
    `divergence` (f-DPO; see divergence_scores) replaces each log-ratio in `h` by its score, before
    `ipo`'s and `sigmoid_norm`'s per-token division; only the losses on `h` take one other than
    reverse_kl, and the rewards stay DPO's log-ratios.
    Returns (losses, chosen_rewards, rejected_rewards), each [B].
    """
    if reference_free:
        ref_chosen_logps = torch.zeros_like(ref_chosen_logps)
        ref_rejected_logps = torch.zeros_like(ref_rejected_logps)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_scores = divergence_scores(chosen_logratios, divergence, divergence_alpha)
    rejected_scores = divergence_scores(rejected_logratios, divergence, divergence_alpha)
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type '{loss_type}' needs chosen_lengths and rejected_lengths")
        chosen_logratios, chosen_scores = chosen_logratios / chosen_lengths, chosen_scores / chosen_lengths
        rejected_logratios, rejected_scores = rejected_logratios / rejected_lengths, rejected_scores / rejected_lengths
    logits = chosen_scores - rejected_scores
    eps = label_smoothing

    if loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "discopop":
        rho = beta * logits
        modulation = torch.sigmoid(rho / discopop_tau)
        losses = (1 - modulation) * -F.logsigmoid(rho) + modulation * torch.exp(-rho)
    elif loss_type == "sigmoid":
        # With eps > 0 this is conservative DPO: the label is flipped with probability eps.
        losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    elif loss_type == "dpop":
        penalty = torch.clamp(ref_chosen_logps - policy_chosen_logps, min=0)
        losses = -F.logsigmoid(beta * (logits - dpop_lambda * penalty))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        # Unbiased under label noise eps (Chowdhury et al., 2024).
        losses = (-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        losses = -F.logsigmoid(chosen_rewards - bco_delta) - F.logsigmoid(-(rejected_rewards - bco_delta))
    elif loss_type == "exo_pair":
        # KL(p_theta || p_target), target (1 - eps, eps); eps = 0 would make it undefined.
        eps = eps or 1e-3
        losses = torch.sigmoid(beta * logits) * (F.logsigmoid(beta * logits) - math.log(1 - eps)) + torch.sigmoid(
            -beta * logits
        ) * (F.logsigmoid(-beta * logits) - math.log(eps))
    elif loss_type == "nca_pair":
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        losses = (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 1 / (2 * beta)) ** 2 + (rejected_logratios + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        # Anchored: push chosen up and rejected down in absolute terms.
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        # Anchored: push chosen down, rejected down more.
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * logits))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    paired: bool = True,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AOT (Melnyk et al., 2024): DPO's logistic loss on sorted quantiles rather than on pairs, which asks
    for first-order stochastic dominance of one distribution over another within the batch.

    Paired (`aot`): the policy's margins `log pi(y_w|x) - log pi(y_l|x)` and the reference's, each sorted
    ascending, `d_k = sort(policy margins)_k - sort(reference margins)_k`. Unpaired (`aot_unpaired`):
    `d_k = sort(c)_k - sort(r)_k`. Then `aot = -(1 - eps) log sigmoid(beta d_k) - eps log sigmoid(-beta d_k)`.
    The batch is the caller's: one micro-batch on one rank, as TRL sorts it. The k-th loss belongs to the
    k-th quantile, not to pair k (only their mean is a pair statistic); the rewards are DPO's, per pair.
    Returns (losses, chosen_rewards, rejected_rewards), each [B].
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if paired:
        upper, lower = policy_chosen_logps - policy_rejected_logps, ref_chosen_logps - ref_rejected_logps
    else:
        upper, lower = chosen_logratios, rejected_logratios
    delta = torch.sort(upper).values - torch.sort(lower).values
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024) on unpaired completions y with labels (1 desirable, 0 not):
    `r = log pi(y|x) - log ref(y|x)`,
    `kto = w_D * (1 - sigmoid(beta * (r - z0)))` for desirable y, `w_U * (1 - sigmoid(beta * (z0 - r)))`
    for undesirable y, where `z0` (`kl`, no gradient) is the reference point: the policy's KL from
    the reference estimated on mismatched prompt/completion pairs (`kto_kl`). Returns (losses,
    rewards = beta * r), each [B]."""
    logratios = policy_logps - reference_logps
    desirable = labels.to(logratios.dtype)
    losses = desirable * desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    losses = losses + (1 - desirable) * undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return losses, beta * logratios.detach()


def kto_kl(mismatched_policy_logps: torch.Tensor, mismatched_reference_logps: torch.Tensor, reduce=None):
    """KTO's reference point: `z0 = max(0, mean_j [log pi(y_j|x_i) - log ref(y_j|x_i)])` over mismatched
    pairs (each prompt with another row's completion), detached; `reduce` sums [sum, count] over ranks
    (the batch is every rank's)."""
    logratios = (mismatched_policy_logps - mismatched_reference_logps).detach().double()
    totals = torch.stack([logratios.sum(), torch.tensor(float(logratios.numel()), dtype=torch.float64)]).cpu()
    if reduce is not None:
        totals = reduce(totals)
    return (totals[0] / totals[1]).clamp(min=0).to(mismatched_policy_logps.dtype).to(mismatched_policy_logps.device)


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen completion's mean per-token negative log-likelihood, [B]:
    `sft = -log pi(y_w|x) / |y_w|`. Added to a preference loss (`dpo.loss: [sigmoid, sft]`) it is
    RPO, which keeps the chosen completions' likelihood from falling."""
    return -policy_chosen_logps / chosen_lengths


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024), reference-free, on per-token averages with a target margin:
    `simpo = -log sigmoid(beta * (avg(y_w) - avg(y_l)) - gamma)`; its rewards are `beta * avg(y)`.
    The paper's beta is 2-10 (DPO's 0.1 barely moves it). Returns (losses, chosen_rewards,
    rejected_rewards), each [B]."""
    chosen = beta * policy_chosen_logps / chosen_lengths
    rejected = beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al., 2024), reference-free: the chosen completion's NLL plus `lam` times the
    log odds-ratio loss, with odds from per-token averages, `odds(y) = p / (1 - p)`, `p = exp(avg(y))`:
    `orpo = -avg(y_w) - lam * log sigmoid(log odds(y_w) - log odds(y_l))`,
    `log odds(y) = avg(y) - log(1 - exp(avg(y)))`. Its rewards are `lam * avg(y)`. Returns
    (losses, chosen_rewards, rejected_rewards), each [B]."""
    chosen, rejected = policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths

    def log_odds(avg: torch.Tensor) -> torch.Tensor:
        return avg - torch.log(-torch.expm1(avg))  # log(1 - e^a) without cancellation near a = 0

    losses = -chosen - lam * F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    return losses, lam * chosen.detach(), lam * rejected.detach()
