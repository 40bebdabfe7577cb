"""Label log-probs straight from the final hidden states, never holding [batch, tokens, vocab].

`install(model, chunk_size)` teaches the model's LM head a second job: while `scoring(model,
index, targets)` is active, the head returns the log-prob of each target at its position ([N])
instead of logits. Only positions that are scored (completion tokens) go through the head,
`chunk_size` at a time, and no chunk's logits outlive it, so peak memory is chunk_size x vocab, not
batch x length x vocab. On request the same chunks also give log sum_v p_v^2 at each position, which
WPO's weights read. With a frozen head (the LoRA case) each chunk's gradient with respect to the
hidden states is formed in the forward, while its softmax is at hand; a trainable head's backward
recomputes the logits. The head stays the same module, so DeepSpeed's ZeRO-3 hooks still gather its
weight.
"""

from __future__ import annotations

import contextlib

import torch


class LabelLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[label], chunk by chunk.

    hidden [N, H], weight [V, H], bias [V] or None, labels [N] -> float32 [N].

    `gradient_in_forward` (only `hidden` needs a gradient): each chunk's softmax, already computed
    for the log-normalizer, also gives d logp / d hidden = (onehot(label) - softmax) @ weight, kept
    as [N, H]; backward only scales it by the incoming gradient. That spares backward a second
    [chunk, vocab] matmul and softmax per chunk, and it keeps no reference to the head's weight.
    Otherwise backward recomputes each chunk's logits for the weight's and bias's gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, gradient_in_forward: bool, sum_sq: bool = False):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_sum_sq = torch.empty_like(out) if sum_sq else None
        direction = torch.empty_like(hidden) if gradient_in_forward else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _logits(hidden[start:end], weight, bias)
            if direction is not None:
                out[start:end], direction[start:end], chunk_sum_sq = _label_logps_and_direction(
                    logits, labels[start:end], weight, sum_sq
                )
            elif sum_sq:
                out[start:end], chunk_sum_sq = _label_logps_and_sum_sq(logits, labels[start:end])
            else:
                out[start:end], chunk_sum_sq = _label_logps(logits, labels[start:end]), None
            if sum_sq:
                log_sum_sq[start:end] = chunk_sum_sq
            del logits  # before the next chunk's logits exist
        ctx.gradient_in_forward = gradient_in_forward
        ctx.save_for_backward(*((direction,) if gradient_in_forward else (hidden, weight, bias, labels)))
        ctx.chunk_size = chunk_size
        if not sum_sq:
            return out
        ctx.mark_non_differentiable(log_sum_sq)
        return out, log_sum_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_log_sum_sq=None):
        if ctx.gradient_in_forward:
            (direction,) = ctx.saved_tensors
            return (direction * grad_out[:, None]).to(direction.dtype), None, None, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            chunk_grad = grad_out[start:end, None]
            # d(logit_label - logsumexp)/d logits = onehot(label) - softmax
            # (in place, so a chunk holds two [chunk, vocab] float32 tensors at most)
            grad_logits = _logits(hidden[start:end], weight, bias).softmax(1).mul_(-chunk_grad)
            grad_logits.scatter_add_(1, labels[start:end, None], chunk_grad)
            if need_hidden:
                grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight += grad_logits.T @ hidden[start:end].float()
            if need_bias:
                grad_bias += grad_logits.sum(0)
            del grad_logits  # before the next chunk's logits exist
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _label_logps_and_direction(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, sum_sq: bool):
    """([c] log-probs of `labels`, [c, H] their gradients with respect to the hidden states, [c] log sum_v p_v^2
    or None) from float32 logits [c, V], which are overwritten. The same rounding points as the recomputing
    backward: onehot - softmax is formed in float32 before it meets the weight in the weight's dtype."""
    target_logits = logits.gather(1, labels[:, None]).squeeze(1)
    shift = logits.amax(1, keepdim=True)
    unnormalized = logits.sub_(shift).exp_()  # the logits' storage: one [c, V] tensor in all
    total = unnormalized.sum(1, keepdim=True)
    log_normalizer = shift.squeeze(1) + total.squeeze(1).log()
    log_sum_sq = _log_sum_sq(unnormalized, total) if sum_sq else None
    softmax_minus_onehot = unnormalized.div_(total)
    softmax_minus_onehot.scatter_add_(1, labels[:, None], torch.full_like(total, -1.0))
    direction = softmax_minus_onehot.to(weight.dtype) @ weight
    return target_logits - log_normalizer, direction.neg_(), log_sum_sq


def _label_logps_and_sum_sq(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([c] log-probs of `labels`, as _label_logps gives them, [c] log sum_v p_v^2) from float32 logits
    [c, V], which are overwritten."""
    logps = _label_logps(logits, labels)
    unnormalized = logits.sub_(logits.amax(1, keepdim=True)).exp_()
    return logps, _log_sum_sq(unnormalized, unnormalized.sum(1, keepdim=True))


def _log_sum_sq(unnormalized: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 with p = unnormalized / total: 2 (log ||unnormalized||_2 - log total). The largest
    entry is exp(0) = 1, so the norm is at least 1 and never underflows; no [c, V] temporary."""
    return 2 * (torch.linalg.vector_norm(unnormalized, dim=1).log() - total.squeeze(1).log())


def _label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # A function of its own, so one chunk's logits are freed before the next chunk's are made.
    return logits.gather(1, labels[:, None]).squeeze(1) - logits.logsumexp(1)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The same op as the plain head (rounded to the model dtype), then float32 as sequence_logps does.
    return torch.nn.functional.linear(hidden, weight, bias).float()


def label_logps_at(hidden, weight, bias, index, targets, chunk_size: int, sum_sq: bool = False):
    """hidden [R, T, H]; index [N] flat positions into R*T; targets [N] -> [N] float32 log-probs of
    each target given the hidden state at its position; with `sum_sq`, also [N] log sum_v p_v^2 at each
    position (no gradient; WPO's weights)."""
    # Decided here: inside forward, grad mode is always off.
    gradient_in_forward = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )
    picked = hidden.flatten(0, 1)[index]
    return LabelLogps.apply(picked, weight, bias, targets, chunk_size, gradient_in_forward, sum_sq)


def _head(model):
    """The plain nn.Linear LM head of a (PEFT-wrapped) causal LM, or None where chunking would change
    the function (a LoRA-wrapped head, logit soft-capping or scaling)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    config = getattr(base, "config", None)
    if type(head) is not torch.nn.Linear:
        return None
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    for c in configs:
        if getattr(c, "final_logit_softcapping", None):  # Gemma-2/3
            return None
        # Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier
        for key in ("logit_scale", "logits_scaling", "lm_head_multiplier"):
            if getattr(c, key, None) not in (None, 1, 1.0):
                return None
    return head


def install(model, chunk_size: int) -> bool:
    """Give the LM head its label-log-prob mode; returns False (plain logits kept) where unsafe."""
    head = _head(model)
    if head is None or chunk_size <= 0:
        return False
    plain_forward = head.forward

    def forward(hidden_states):
        if head.dpo_lora_targets is None:
            return plain_forward(hidden_states)
        index, targets, sum_sq = head.dpo_lora_targets
        # Outside autocast: the logits round in the head's dtype, as a recomputing backward's do.
        with torch.autocast(hidden_states.device.type, enabled=False):
            scores = label_logps_at(
                hidden_states, head.weight, head.bias, index, targets, head.dpo_lora_chunk_size, sum_sq
            )
        return torch.stack(scores, 1) if sum_sq else scores

    head.forward = forward
    head.dpo_lora_plain_forward = plain_forward  # what uninstall() puts back (float32_residual's head too)
    head.dpo_lora_targets = None
    head.dpo_lora_chunk_size = chunk_size
    return True


def uninstall(model) -> None:
    """Back to plain logits (the self-check found the chunked head wrong for this model)."""
    head = _installed_head(model)
    if head is not None:
        head.forward = head.dpo_lora_plain_forward
        del head.dpo_lora_plain_forward, head.dpo_lora_targets, head.dpo_lora_chunk_size


def _installed_head(model):
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    return head if hasattr(head, "dpo_lora_targets") else None


@contextlib.contextmanager
def scoring(model, index: torch.Tensor, targets: torch.Tensor, enabled: bool = True, sum_sq: bool = False):
    """Within the block the model's `.logits` are the [N] log-probs of `targets` at flat positions
    `index` (see label_logps_at), or with `sum_sq` [N, 2]: those and log sum_v p_v^2 at each position;
    yields False (and does nothing) when install() was not applied or `enabled` is False."""
    peft_model = getattr(model, "module", model)
    head = _installed_head(peft_model)
    if head is None or not enabled:
        yield False
        return
    head.dpo_lora_targets = (index, targets, sum_sq)
    try:
        yield True
    finally:
        head.dpo_lora_targets = None
