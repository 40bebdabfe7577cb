"""Every loss against an independent float64 oracle written from the papers' formulas: values, and
gradients against the oracle's central differences."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lora.core.schema import LOSS_TYPES
from dpo_lora.train.losses import aot_loss, dpo_loss, kto_kl, kto_loss, orpo_loss, sft_loss, simpo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def oracle(loss_type, pc, pr, rc, rr, beta, eps, lc, lr, delta, lam=0.0, tau=0.05):
    """One example's loss, in Python floats (float64), straight from each formula."""
    if loss_type in ("ipo", "sigmoid_norm"):
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    c, r = pc - rc, pr - rr  # chosen / rejected log-ratios
    h = c - r
    if loss_type == "sigmoid":  # DPO; conservative DPO when eps > 0
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "hinge":  # SLiC
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "robust":  # rDPO
        return (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -log_sigmoid(beta * c - delta) - log_sigmoid(-(beta * r - delta))
    if loss_type == "exo_pair":  # KL between p = sigmoid(beta h) and target (1 - eps, eps)
        eps = eps or 1e-3
        p = sigmoid(beta * h)
        return p * (math.log(p) - math.log(1 - eps)) + (1 - p) * (math.log(1 - p) - math.log(eps))
    if loss_type == "nca_pair":
        return -log_sigmoid(beta * c) - 0.5 * log_sigmoid(-beta * c) - 0.5 * log_sigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - sigmoid(beta * c)) + sigmoid(beta * r)
    if loss_type == "apo_down":
        return sigmoid(beta * c) + (1 - sigmoid(beta * h))
    if loss_type == "dpop":  # DPO-Positive, Pal et al. 2024, eq. 3
        return -log_sigmoid(beta * (h - lam * max(0.0, rc - pc)))
    if loss_type == "sigmoid_norm":  # DPO on per-token averages
        return -log_sigmoid(beta * h)
    if loss_type == "discopop":  # Lu et al. 2024, eq. 5: logistic and exponential, blended by the log-ratio
        m = sigmoid(beta * h / tau)
        return (1 - m) * -log_sigmoid(beta * h) + m * math.exp(-beta * h)
    raise AssertionError(loss_type)


def random_logps(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logps = [-torch.rand(n, generator=g, dtype=torch.float64) * 60 - 1 for _ in range(4)]
    lengths = [torch.randint(1, 40, (n,), generator=g).double() for _ in range(2)]
    return logps, lengths


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_matches_float64_oracle_on_random_inputs(loss_type, eps):
    (pc, pr, rc, rr), (lc, lr) = random_logps(64, seed=hash((loss_type, eps)) % 1000)
    beta, delta, lam = 0.3, 0.05, 2.0
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
        chosen_lengths=lc, rejected_lengths=lr, bco_delta=delta, dpop_lambda=lam,
    )  # fmt: skip
    expected = [
        oracle(loss_type, *(t[i].item() for t in (pc, pr, rc, rr)), beta, eps, lc[i].item(), lr[i].item(), delta, lam)
        for i in range(64)
    ]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    scale_c, scale_r = (lc, lr) if loss_type in ("ipo", "sigmoid_norm") else (1.0, 1.0)
    torch.testing.assert_close(chosen_rewards, beta * (pc / scale_c - rc / scale_c))
    torch.testing.assert_close(rejected_rewards, beta * (pr / scale_r - rr / scale_r))


def test_sigmoid_loss_hand_computed():
    # h = (-10 - -12) - (-20 - -19) = 3; beta = 0.5 -> -log sigmoid(1.5) = log(1 + e^-1.5)
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-19.0]), beta=0.5
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-6)
    assert chosen.item() == pytest.approx(1.0) and rejected.item() == pytest.approx(-0.5)


def test_policy_equal_reference_gives_log2_and_zero_rewards():
    (pc, pr, _, _), _ = random_logps(16, seed=1)
    loss, chosen, rejected = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


# apo_down lowers both by design; discopop's modulation, steep at h = 0 (tau 0.05), tips its
# gradient there the other way (its paper's loss is not convex), tested on its own below.
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("apo_down", "discopop")])
def test_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    # Start where policy == reference; every loss but apo_down (which lowers both by design)
    # must raise the chosen log-prob and lower the rejected one.
    (pc, pr, rc, rr), (lc, lr) = random_logps(8, seed=2)
    pc, pr = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    losses.sum().backward()
    assert torch.all(pc.grad < 0), "descent must increase the chosen log-prob"
    assert torch.all(pr.grad > 0), "descent must decrease the rejected log-prob"


def test_apo_down_lowers_rejected_first_then_chosen():
    # d loss / d c = beta * (sigmoid'(beta c) - sigmoid'(beta (c - r))): zero at policy == reference,
    # positive (chosen pushed down) once the policy prefers chosen; rejected is always pushed down.
    (_, _, rc, rr), _ = random_logps(8, seed=3)
    pc, pr = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="apo_down")[0].sum().backward()
    assert torch.all(pc.grad.abs() < 1e-12) and torch.all(pr.grad > 0)
    pc, pr = (rc + 10).requires_grad_(), (rr - 10).requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="apo_down")[0].sum().backward()
    assert torch.all(pc.grad > 0) and torch.all(pr.grad > 0)


def test_conservative_dpo_differs_from_plain_and_label_smoothing_is_used():
    (pc, pr, rc, rr), _ = random_logps(8, seed=4)
    plain = dpo_loss(pc, pr, rc, rr, beta=0.1)[0]
    smoothed = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)[0]
    assert not torch.allclose(plain, smoothed)


def test_reference_free_ignores_reference():
    (pc, pr, rc, rr), _ = random_logps(8, seed=5)
    free = dpo_loss(pc, pr, rc, rr, beta=0.1, reference_free=True)
    zero_ref = dpo_loss(pc, pr, torch.zeros_like(rc), torch.zeros_like(rr), beta=0.1)
    for a, b in zip(free, zero_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_rewards_are_detached_and_ipo_requires_lengths():
    (pc, pr, rc, rr), _ = random_logps(4, seed=6)
    _, chosen, rejected = dpo_loss(pc.requires_grad_(), pr, rc, rr, beta=0.1)
    assert not chosen.requires_grad and not rejected.requires_grad
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")


def test_ipo_rewards_are_per_token():
    """IPO compares per-token average log-ratios, and its reported rewards are those too."""
    (pc, pr, rc, rr), _ = random_logps(6, seed=11)
    chosen_lengths, rejected_lengths = torch.tensor([3.0, 7, 1, 12, 5, 9]), torch.tensor([4.0, 2, 8, 1, 6, 10])
    _, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="ipo", chosen_lengths=chosen_lengths,
                                   rejected_lengths=rejected_lengths)  # fmt: skip
    torch.testing.assert_close(chosen, 0.3 * (pc - rc) / chosen_lengths)
    torch.testing.assert_close(rejected, 0.3 * (pr - rr) / rejected_lengths)


# The terms outside dpo_loss, one example at a time in float64: log-probs (sums) and lengths in.
def sft_oracle(pc, pr, lc, lr):
    return -pc / lc


def simpo_oracle(pc, pr, lc, lr, beta=2.5, gamma=1.2):  # Meng et al. 2024, eq. 6
    return -log_sigmoid(beta * pc / lc - beta * pr / lr - gamma)


def orpo_oracle(pc, pr, lc, lr, lam=0.25):  # Hong et al. 2024, eqs. 6-7: odds(y) = P / (1 - P), P = e^avg
    def odds(avg):
        return math.exp(avg) / (1 - math.exp(avg))

    return -pc / lc - lam * log_sigmoid(math.log(odds(pc / lc) / odds(pr / lr)))


POLICY_ONLY = {
    "sft": (lambda pc, pr, lc, lr: sft_loss(pc, lc), sft_oracle),
    "simpo": (lambda pc, pr, lc, lr: simpo_loss(pc, pr, lc, lr, beta=2.5, gamma=1.2)[0], simpo_oracle),
    "orpo": (lambda pc, pr, lc, lr: orpo_loss(pc, pr, lc, lr, lam=0.25)[0], orpo_oracle),
}


def central_difference(f, args: list[float], i: int, h: float = 1e-6) -> float:
    up, down = list(args), list(args)
    up[i] += h
    down[i] -= h
    return (f(*up) - f(*down)) / (2 * h)


@pytest.mark.parametrize("name", POLICY_ONLY)
def test_policy_only_terms_match_their_float64_oracle_in_values_and_gradients(name):
    loss, expected = POLICY_ONLY[name]
    (pc, pr, _, _), (lc, lr) = random_logps(32, seed=21)
    pc, pr = (pc / 4).requires_grad_(), (pr / 4).requires_grad_()  # per-token averages of -0.01 to -15
    losses = loss(pc, pr, lc, lr)
    grad_c, grad_r = torch.autograd.grad(losses.sum(), (pc, pr), allow_unused=True, materialize_grads=True)
    for i in range(32):
        args = [pc[i].item(), pr[i].item(), lc[i].item(), lr[i].item()]
        assert losses[i].item() == pytest.approx(expected(*args), rel=1e-10, abs=1e-12), i
        assert grad_c[i].item() == pytest.approx(central_difference(expected, args, 0), rel=1e-5, abs=1e-9), i
        assert grad_r[i].item() == pytest.approx(central_difference(expected, args, 1), rel=1e-5, abs=1e-9), i


def test_dpo_positive_gradients_match_the_oracle_and_its_penalty_lifts_the_chosen():
    (pc, pr, rc, rr), _ = random_logps(32, seed=22)
    pc = (rc + torch.linspace(-3, 3, 32, dtype=torch.float64)).requires_grad_()  # below the reference, then above
    pr = pr.clone().requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="dpop", dpop_lambda=5.0)[0].sum().backward()
    sigmoid_grad = torch.autograd.grad(dpo_loss(pc, pr, rc, rr, beta=0.3)[0].sum(), pc)[0]
    for i in range(32):
        args = [pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item()]

        def f(*a):
            return oracle("dpop", *a, beta=0.3, eps=0.0, lc=1.0, lr=1.0, delta=0.0, lam=5.0)

        assert pc.grad[i].item() == pytest.approx(central_difference(f, args, 0), rel=1e-5, abs=1e-9), i
        assert pr.grad[i].item() == pytest.approx(central_difference(f, args, 1), rel=1e-5, abs=1e-9), i
    below = pc.detach() < rc
    # Below the reference the penalty pushes the chosen up harder than DPO does; above, it is off.
    assert torch.all(pc.grad[below] < sigmoid_grad[below]) and below.any()
    torch.testing.assert_close(pc.grad[~below], sigmoid_grad[~below])


def test_simpo_and_orpo_rewards_are_scaled_per_token_log_probs():
    (pc, pr, _, _), (lc, lr) = random_logps(8, seed=23)
    _, chosen, rejected = simpo_loss(pc, pr, lc, lr, beta=2.5, gamma=1.2)
    torch.testing.assert_close(chosen, 2.5 * pc / lc)
    torch.testing.assert_close(rejected, 2.5 * pr / lr)
    _, chosen, rejected = orpo_loss(pc, pr, lc, lr, lam=0.25)
    torch.testing.assert_close(chosen, 0.25 * pc / lc)
    assert not chosen.requires_grad


def kto_oracle(policy, reference, label, z0, beta=0.4, w_d=1.0, w_u=1.5):
    """Ethayarajh et al. 2024, eq. 8: L = w_y - v(x, y), v = w_D sigmoid(beta (r - z0)) when y is
    desirable, w_U sigmoid(beta (z0 - r)) when not, r = log pi - log ref."""
    r = policy - reference
    if label:
        return w_d - w_d * sigmoid(beta * (r - z0))
    return w_u - w_u * sigmoid(beta * (z0 - r))


def test_kto_matches_its_float64_oracle_in_values_and_gradients_and_its_reference_point_is_constant():
    (policy, _, reference, _), _ = random_logps(32, seed=24)
    policy = (reference + torch.linspace(-4, 4, 32, dtype=torch.float64)).requires_grad_()
    labels = torch.arange(32) % 3 != 0  # desirable and undesirable rows
    z0 = torch.tensor(0.7, dtype=torch.float64)
    losses, rewards = kto_loss(policy, reference, labels, z0, beta=0.4, desirable_weight=1.0, undesirable_weight=1.5)
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    for i in range(32):
        args = [policy[i].item(), reference[i].item(), bool(labels[i]), 0.7]
        assert losses[i].item() == pytest.approx(kto_oracle(*args), rel=1e-10, abs=1e-12), i
        assert grad[i].item() == pytest.approx(central_difference(kto_oracle, args, 0), rel=1e-5, abs=1e-9), i
    torch.testing.assert_close(rewards, 0.4 * (policy - reference).detach())
    # Desirable completions are pushed up, undesirable ones down.
    assert torch.all(grad[labels] < 0) and torch.all(grad[~labels] > 0)


def test_ktos_reference_point_is_the_clamped_mean_mismatched_log_ratio_over_all_ranks():
    policy = torch.tensor([-10.0, -12.0, -9.0], requires_grad=True)
    reference = torch.tensor([-11.0, -11.5, -10.0])
    # (1.0 - 0.5 + 1.0) / 3 = 0.5, by hand
    assert kto_kl(policy, reference).item() == pytest.approx(0.5)
    assert not kto_kl(policy, reference).requires_grad
    assert kto_kl(reference, policy).item() == 0.0  # a negative mean is clamped to 0
    # Another rank's batch: [sum 2.5, count 2] joins this one's [1.5, 3]: (1.5 + 2.5) / 5 = 0.8.
    assert kto_kl(policy, reference, reduce=lambda t: t + torch.tensor([2.5, 2.0], dtype=torch.float64)).item() == (
        pytest.approx(0.8)
    )


@pytest.mark.parametrize("loss_type", ["discopop", "sigmoid_norm"])
def test_discopop_and_sigmoid_norm_gradients_match_the_oracle(loss_type):
    """Gradients against the float64 oracle's central differences, in the policy's log-probs. At
    h = 0 discopop's gradient (tau 0.05) lowers the margin: its modulation's slope outweighs the
    logistic part there, by the paper's formula (d/drho at 0 = (1 - log 2) / (4 tau) - 3/4 > 0)."""
    (pc, pr, rc, rr), (lc, lr) = random_logps(8, seed=5)
    beta, tau = 0.3, 0.05
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr, discopop_tau=tau)  # fmt: skip
    losses.sum().backward()
    step = 1e-6
    for i in range(8):
        args = [t[i].item() for t in (pc, pr, rc, rr)]

        def f(pc_i, pr_i, i=i, args=args):
            return oracle(loss_type, pc_i, pr_i, args[2], args[3], beta, 0.0, lc[i].item(), lr[i].item(), 0.0, tau=tau)

        d_chosen = (f(args[0] + step, args[1]) - f(args[0] - step, args[1])) / (2 * step)
        d_rejected = (f(args[0], args[1] + step) - f(args[0], args[1] - step)) / (2 * step)
        assert pc.grad[i].item() == pytest.approx(d_chosen, rel=1e-5, abs=1e-8)
        assert pr.grad[i].item() == pytest.approx(d_rejected, rel=1e-5, abs=1e-8)
    if loss_type == "discopop":
        at_zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        loss, _, _ = dpo_loss(at_zero, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), beta=1.0, loss_type="discopop", discopop_tau=tau)  # fmt: skip
        loss.backward()
        assert at_zero.grad.item() == pytest.approx((1 - math.log(2)) / (4 * tau) - 0.75, rel=1e-9)


def aot_oracle(paired: bool, beta: float, eps: float, *logps: float) -> float:
    """AOT's batch loss (Melnyk et al. 2024) in Python floats: the mean smoothed logistic loss of the
    k-th smallest policy margin against the k-th smallest reference margin (paired), or of the k-th
    smallest chosen log-ratio against the k-th smallest rejected one (unpaired)."""
    n = len(logps) // 4
    pc, pr, rc, rr = (logps[i * n : (i + 1) * n] for i in range(4))
    if paired:
        upper, lower = [a - b for a, b in zip(pc, pr, strict=True)], [a - b for a, b in zip(rc, rr, strict=True)]
    else:
        upper, lower = [a - b for a, b in zip(pc, rc, strict=True)], [a - b for a, b in zip(pr, rr, strict=True)]
    terms = [
        -(1 - eps) * log_sigmoid(beta * (u - v)) - eps * log_sigmoid(-beta * (u - v))
        for u, v in zip(sorted(upper), sorted(lower), strict=True)
    ]
    return sum(terms) / n


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_aot_matches_its_float64_oracle_in_values_and_gradients(paired, eps):
    (pc, pr, rc, rr), _ = random_logps(12, seed=31 + paired)
    beta = 0.3
    inputs = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    losses, chosen_rewards, rejected_rewards = aot_loss(*inputs, beta=beta, paired=paired, label_smoothing=eps)
    grads = torch.autograd.grad(losses.mean(), inputs)
    flat = [x for t in (pc, pr, rc, rr) for x in t.tolist()]
    assert losses.mean().item() == pytest.approx(aot_oracle(paired, beta, eps, *flat), rel=1e-12)
    expected_grads = [central_difference(lambda *a: aot_oracle(paired, beta, eps, *a), flat, i) for i in range(48)]
    torch.testing.assert_close(
        torch.cat(grads), torch.tensor(expected_grads, dtype=torch.float64), rtol=1e-5, atol=1e-9
    )
    # The rewards stay DPO's, pair by pair.
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr - rr))


def test_aot_sorts_across_the_batch_one_pair_is_dpo_and_the_order_of_pairs_does_not_matter():
    (pc, pr, rc, rr), _ = random_logps(16, seed=41)
    for paired in (True, False):
        one = aot_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.2, paired=paired)[0]
        torch.testing.assert_close(one, dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.2)[0])
        whole = aot_loss(pc, pr, rc, rr, beta=0.2, paired=paired)[0].mean()
        order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
        shuffled = aot_loss(pc[order], pr[order], rc[order], rr[order], beta=0.2, paired=paired)[0].mean()
        torch.testing.assert_close(shuffled, whole)
        # Across a batch it is not DPO: pairs meet other pairs' quantiles.
        assert abs(whole.item() - dpo_loss(pc, pr, rc, rr, beta=0.2)[0].mean().item()) > 1e-3


def f_prime(u: float, divergence: str, alpha: float) -> float:
    """f'(u) from the f-DPO paper's table (Wang et al. 2023), its alpha-divergence in the paper's own
    parametrization: f'(u) = (1 - u^-a) / a with a = 1 - alpha (alpha: TRL's coefficient, ours)."""
    if divergence == "reverse_kl":
        return math.log(u) + 1
    if divergence == "forward_kl":
        return -1 / u
    if divergence == "js_divergence":
        return math.log(2 * u / (1 + u))
    a = 1 - alpha
    return (1 - u ** (-a)) / a


DIVERGENCE_CASES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3), ("alpha_divergence", 0.8)]


@pytest.mark.parametrize(("divergence", "alpha"), DIVERGENCE_CASES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"])
def test_f_divergences_match_the_papers_f_prime_in_values_and_gradients(divergence, alpha, loss_type):
    """f-DPO: each log-ratio log u replaced by f'(u) - f'(1), taken from the paper's table; then each
    loss's own formula (the oracle above) on those scores. Log-ratios within +-3, where exp is tame."""
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-torch.rand(16, generator=g, dtype=torch.float64) * 20 - 1 for _ in range(4))
    pc, pr = rc + (torch.rand(16, generator=g, dtype=torch.float64) * 6 - 3), rr + (torch.rand(16, generator=g, dtype=torch.float64) * 6 - 3)  # fmt: skip
    lc, lr = (torch.randint(1, 30, (16,), generator=g).double() for _ in range(2))
    beta, eps = 0.7, 0.1 if loss_type in ("robust", "exo_pair") else 0.0

    def score(p, r):
        return f_prime(math.exp(p - r), divergence, alpha) - f_prime(1.0, divergence, alpha)

    def expected(pc_, pr_, rc_, rr_, lc_, lr_):  # the scores in the log-ratios' place, reference 0
        return oracle(loss_type, score(pc_, rc_), score(pr_, rr_), 0.0, 0.0, beta, eps, lc_, lr_, 0.0, tau=0.05)

    inputs = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    losses, chosen_rewards, _ = dpo_loss(
        *inputs, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=lc,
        rejected_lengths=lr, divergence=divergence, divergence_alpha=alpha,
    )  # fmt: skip
    grad_c, grad_r = torch.autograd.grad(losses.sum(), inputs)
    for i in range(16):
        args = [t[i].item() for t in (pc, pr, rc, rr, lc, lr)]
        assert losses[i].item() == pytest.approx(expected(*args), rel=1e-9, abs=1e-12), i
        assert grad_c[i].item() == pytest.approx(central_difference(expected, args, 0), rel=1e-5, abs=1e-8), i
        assert grad_r[i].item() == pytest.approx(central_difference(expected, args, 1), rel=1e-5, abs=1e-8), i
    per_token = lc if loss_type in ("ipo", "sigmoid_norm") else 1.0
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc) / per_token)  # the rewards stay DPO's


def test_reverse_kl_is_dpo_and_alpha_near_one_tends_to_it():
    (pc, pr, rc, rr), _ = random_logps(8, seed=6)
    plain = dpo_loss(pc, pr, rc, rr, beta=0.1)[0]
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.1, divergence="reverse_kl")[0], plain)
    g = torch.Generator().manual_seed(7)
    pc, pr = (
        rc + torch.randn(8, generator=g, dtype=torch.float64),
        rr + torch.randn(8, generator=g, dtype=torch.float64),
    )
    near = dpo_loss(pc, pr, rc, rr, beta=0.1, divergence="alpha_divergence", divergence_alpha=1 - 1e-4)[0]
    torch.testing.assert_close(near, dpo_loss(pc, pr, rc, rr, beta=0.1)[0], rtol=1e-3, atol=1e-4)
    extreme = torch.tensor([-500.0])  # the policy far below the reference: clamped, finite
    for divergence in ("forward_kl", "alpha_divergence"):
        loss = dpo_loss(extreme, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, divergence=divergence)[0]
        assert torch.isfinite(loss).all(), divergence
