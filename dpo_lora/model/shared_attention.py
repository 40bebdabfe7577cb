"""Attention for the shared-prompt layout without a dense mask.

A shared row is [prompt | chosen | rejected | padding] (dpo_lora.data.layout). Each token must see what
it sees in its own unshared sequence, and that splits into two plain causal problems:
- prompt and chosen queries against [prompt | chosen] keys: ordinary top-left causal attention over
  the row's first P + C positions. Batched over the micro-batch on the widest such prefix: right
  padding and a shorter row's rejected tokens lie after every real query of that prefix, so
  causality alone keeps them out (the rejected queries' wrong outputs there are overwritten);
- rejected queries (R) against [prompt | rejected] keys (P + R): causal aligned to the lower right
  (rejected token j sees the whole prompt and rejected tokens 0..j), one call per row because P and
  R differ between rows.

Both are fused SDPA calls with no materialised [T, T] mask and no work on the rejected-to-chosen
block or above the diagonal, which the 4D-mask path (`layout.attention_bias`) spends. Registered
with transformers' AttentionInterface as KERNEL; a batch without the layout's lengths (plain rows,
generation) runs transformers' own sdpa function with its own mask, so the model stays an sdpa
model everywhere else.

FLEX_KERNEL (`train.shared_prompt_attention: flex`) runs the same visibility rule as one
FlexAttention call per layer: a block mask skips the blocks above the diagonal and the
rejected-to-chosen block, with no per-row loop and no gathers. It is for CUDA: torch's FlexAttention
has no backward on the CPU, where it runs only without grad (the tests' exactness check), and it
takes no attention dropout. `flex_unavailable` says why it cannot run; the layout then keeps split.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import torch

from dpo_lora.core import transfer

KERNEL = "dpo_lora_shared_prompt"  # the attention implementation name the model is switched to
FLEX_KERNEL = "dpo_lora_shared_prompt_flex"  # ... for FlexAttention (no "flex_attention" in it: transformers
# would build its own block masks for a name that contains it)
KERNELS = {"split": KERNEL, "flex": FLEX_KERNEL}  # by `train.shared_prompt_attention`
PLAN_KEY = "shared_prompt_plan"  # the forward keyword carrying the micro-batch's layout_plan


_PLANNED = contextvars.ContextVar("dpo_lora_planned_forward", default=False)


def register() -> None:
    """Make KERNEL known to transformers (idempotent): this attention, and sdpa's mask builder for
    the batches that fall through to sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(KERNEL, shared_prompt_attention)
    AttentionInterface.register(FLEX_KERNEL, flex_shared_prompt_attention)
    for kernel in KERNELS.values():
        ALL_MASK_ATTENTION_FUNCTIONS.register(kernel, _mask)


@contextlib.contextmanager
def planned(enabled: bool = True):
    """A forward whose batch carries a plan: it builds no attention mask (the attention reads the
    plan), so transformers does not read the padding mask back from the device to decide whether
    it may skip one."""
    token = _PLANNED.set(enabled)
    try:
        yield
    finally:
        _PLANNED.reset(token)


def _mask(*args, **kwargs):
    """sdpa's mask builder, or no mask inside `planned`."""
    from transformers.masking_utils import sdpa_mask

    return None if _PLANNED.get() else sdpa_mask(*args, **kwargs)


def use_on(model, choice: str = "split") -> None:
    """Switch an sdpa model (a PeftModel or a transformers model) to this attention: `choice` is a
    key of KERNELS."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(KERNELS[choice])


def plan_for(kernel: str, lengths: tuple[tuple[int, int, int], ...], length: int, device: torch.device):
    """What `kernel` (one of KERNELS' values) reads as PLAN_KEY for a micro-batch of rows of
    `length` tokens, one (P, C, R) per row: its layout_plan, or FLEX_KERNEL's block mask."""
    return (flex_plan if kernel == FLEX_KERNEL else layout_plan)(lengths, length, device)


def _planned(kernel):
    """transformers' attention-function contract around `kernel(module, query, key, value, plan,
    dropout, scaling) -> [B, T, H, D]`: query [B, H, T, D], key and value [B, Hkv, T, D] ->
    ([B, T, H, D], None). `kwargs[PLAN_KEY]` is the micro-batch's plan (`plan_for`); a batch
    without one runs sdpa with the mask transformers built."""

    @torch.compiler.disable  # a plan per batch: a graph would recompile for each
    @functools.wraps(kernel)
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        plan = kwargs.pop(PLAN_KEY, None)
        if plan is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise ValueError("shared-prompt attention takes no logit softcap or attention sinks")
        return kernel(module, query, key, value, plan, dropout, scaling), None

    return attention


@_planned
def shared_prompt_attention(module, query, key, value, plan, dropout, scaling) -> torch.Tensor:
    """Split attention (the module's docstring) on `plan`, a layout_plan."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    width = plan.head_width
    # Prompt and chosen: sdpa's own function (GQA, scaling, dropout) with plain causal attention.
    head, _ = sdpa_attention_forward(
        module, query[:, :, :width], key[:, :, :width], value[:, :, :width], None, dropout, scaling, is_causal=True
    )  # [B, width, H, D]
    # Rejected: every row's queries and [prompt | rejected] keys in one gather each (one scatter in
    # backward, not a full-size gradient per slice), then one lower-right causal call per row.
    groups = heads // key.shape[1]
    queries = _by_token(query).index_select(0, plan.tail_queries).split(plan.tail_lengths)
    keys = _grouped(_by_token(key).index_select(0, plan.tail_keys), groups).split(plan.tail_key_lengths)
    values = _grouped(_by_token(value).index_select(0, plan.tail_keys), groups).split(plan.tail_key_lengths)
    tails = [
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
        )[0].transpose(0, 1)  # [R, H, D]
        for q, k, v, mask in zip(queries, keys, values, plan.tail_masks, strict=True)
    ]
    pieces = torch.cat([head.flatten(0, 1), *tails])  # [B*width + sum R, H, D]
    return pieces.index_select(0, plan.output).view(batch, length, heads, dim)


def _grouped(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, h, D] key or value heads repeated for the `groups` query heads that share each (GQA);
    without grouping, as they are (repeat_interleave by 1 would still copy them)."""
    return states.repeat_interleave(groups, 1) if groups > 1 else states


def _by_token(states: torch.Tensor) -> torch.Tensor:
    """[B, h, T, D] -> [B*T, h, D], one row per token."""
    return states.transpose(1, 2).flatten(0, 1)


class _Plan(NamedTuple):
    """Index tensors of one micro-batch's shared layout, for every layer of its forward."""

    head_width: int  # the widest prompt + chosen
    tail_queries: torch.Tensor  # flat [B*T] positions of every row's rejected tokens, row after row
    tail_lengths: list[int]  # R of each row with a rejected branch
    tail_keys: torch.Tensor  # flat positions of each such row's [prompt | rejected]
    tail_key_lengths: list[int]  # P + R of each such row
    output: torch.Tensor  # [B*T]: where each position's output lies in [head rows | tails]
    tail_masks: tuple  # each such row's lower-right causal bias, R x (P + R)


@functools.lru_cache(maxsize=8)
def layout_plan(lengths: tuple[tuple[int, int, int], ...], length: int, device: torch.device) -> _Plan:
    """The index tensors and masks of a micro-batch of rows of `length` tokens, one (P, C, R) per row.

    Made before the model's forward and handed to every layer as PLAN_KEY: torch refuses to create
    the masks (tensor subclasses) inside selective checkpointing, which runs the layers' forwards.
    """
    from torch.nn.attention.bias import causal_lower_right

    head_width = max(p + c for p, c, _ in lengths)
    tail_start = len(lengths) * head_width
    tail_queries, tail_keys, output = [], [], []
    for row, (p, c, r) in enumerate(lengths):
        start = row * length
        tail_queries += range(start + p + c, start + p + c + r)
        if r:
            tail_keys += [*range(start, start + p), *range(start + p + c, start + p + c + r)]
        # padding positions read the row's first output: finite, and never seen by a real token
        output += [row * head_width + t for t in range(p + c)] + list(range(tail_start, tail_start + r))
        output += [row * head_width] * (length - p - c - r)
        tail_start += r

    def as_index(values: list[int]) -> torch.Tensor:
        return transfer.to_device(torch.tensor(values, dtype=torch.long), device)

    return _Plan(
        head_width,
        as_index(tail_queries),
        [r for _, _, r in lengths if r],
        as_index(tail_keys),
        [p + r for p, _, r in lengths if r],
        as_index(output),
        tuple(causal_lower_right(r, p + r) for p, _, r in lengths if r),
    )


def flex_unavailable(device: torch.device, attention_dropout: float) -> str | None:
    """Why FLEX_KERNEL cannot train on `device`, or None."""
    if _flex_attention() is None:
        return f"torch {torch.__version__} has no FlexAttention"
    if device.type == "cpu":
        return "torch's FlexAttention has no backward on the CPU"
    if attention_dropout:
        return f"FlexAttention takes no attention dropout (the model's is {attention_dropout})"
    return None


@functools.cache
def _flex_attention():
    """torch's flex_attention, or None where this torch has none."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process: uncompiled it materialises every [T, T] score."""
    return torch.compile(_flex_attention())


@functools.lru_cache(maxsize=8)
def flex_plan(lengths: tuple[tuple[int, int, int], ...], length: int, device: torch.device):
    """The block mask of a micro-batch of rows of `length` tokens, one (P, C, R) per row: a query
    sees a key iff the key is no later and not in the chosen branch when the query is past it
    (a rejected token, or padding: which sees its row's prompt, so its output stays finite).
    Made before the forward, like layout_plan, and shared by every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    prompt_end = transfer.to_device(torch.tensor([p for p, _, _ in lengths]), device)
    chosen_end = transfer.to_device(torch.tensor([p + c for p, c, _ in lengths]), device)

    def visible(row, head, query, key):
        past_chosen = query >= chosen_end[row]
        in_chosen = (key >= prompt_end[row]) & (key < chosen_end[row])
        return (key <= query) & ~(past_chosen & in_chosen)

    return create_block_mask(visible, len(lengths), None, length, length, device=device)


@_planned
def flex_shared_prompt_attention(module, query, key, value, block_mask, dropout, scaling) -> torch.Tensor:
    """One FlexAttention call on `block_mask`, a flex_plan."""
    if dropout:
        raise ValueError("FlexAttention's shared-prompt attention takes no dropout")
    # On the CPU (no grad: the tests) uncompiled, sparing the compile; its outputs are the same.
    flex = _compiled_flex_attention() if query.device.type != "cpu" else _flex_attention()
    output = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return output.transpose(1, 2).contiguous()
