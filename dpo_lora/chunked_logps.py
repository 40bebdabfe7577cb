"""Label log-probs straight from the final hidden states, never holding [batch, tokens, vocab].

`install(model, chunk_size)` teaches the model's LM head a second job: while `scoring(model,
index, targets)` is active, the head returns the log-prob of each target at its position ([N])
instead of logits. Only positions that are scored (completion tokens) go through the head, `chunk_size` at a
time, and the backward pass recomputes each chunk's logits instead of keeping them, so peak memory
is chunk_size x vocab, not batch x length x vocab. The head stays the same module, so DeepSpeed's
ZeRO-3 hooks still gather its weight for forward and backward.
"""

from __future__ import annotations

import contextlib

import torch


class LabelLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[label], chunk by chunk, recomputed in backward.

    hidden [N, H], weight [V, H], bias [V] or None, labels [N] -> float32 [N].
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            out[start:end] = _label_logps(_logits(hidden[start:end], weight, bias), labels[start:end])
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
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
        return grad_hidden, grad_weight, grad_bias, None, None


def _label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # A function of its own, so one chunk's logits are freed before the next chunk's are made.
    return logits.gather(1, labels[:, None]).squeeze(1) - logits.logsumexp(1)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The same op as the plain head (rounded to the model dtype), then float32 as sequence_logps does.
    return torch.nn.functional.linear(hidden, weight, bias).float()


def label_logps_at(hidden, weight, bias, index, targets, chunk_size: int) -> torch.Tensor:
    """hidden [R, T, H]; index [N] flat positions into R*T; targets [N] -> [N] float32 log-probs of
    each target given the hidden state at its position."""
    return LabelLogps.apply(hidden.flatten(0, 1)[index], weight, bias, targets, chunk_size)


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
        index, targets = head.dpo_lora_targets
        # Outside autocast: its backward recomputes the logits, which must round as the forward did.
        with torch.autocast(hidden_states.device.type, enabled=False):
            return label_logps_at(hidden_states, head.weight, head.bias, index, targets, head.dpo_lora_chunk_size)

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
def scoring(model, index: torch.Tensor, targets: torch.Tensor, enabled: bool = True):
    """Within the block the model's `.logits` are the [N] log-probs of `targets` at flat positions
    `index` (see label_logps_at); yields False (and does nothing) when install() was not applied
    or `enabled` is False."""
    peft_model = getattr(model, "module", model)
    head = _installed_head(peft_model)
    if head is None or not enabled:
        yield False
        return
    head.dpo_lora_targets = (index, targets)
    try:
        yield True
    finally:
        head.dpo_lora_targets = None
