"""Attention for the shared-prompt layout without a dense mask.

A shared row is [prompt | chosen | rejected | padding] (dpo_lora.data.layout). Each token must see what
it sees in its own unshared sequence, and that splits into two plain causal problems:
- prompt and chosen queries against [prompt | chosen] keys: ordinary top-left causal attention over
  the row's first P + C positions. Batched over the micro-batch on the widest such prefix: right
  padding and a shorter row's rejected tokens lie after every real query of that prefix, so
  causality alone keeps them out (the rejected queries' wrong outputs there are overwritten);
- rejected queries (R) against [prompt | rejected] keys (P + R): causal aligned to the lower right
  (rejected token j sees the whole prompt and rejected tokens 0..j). P and R differ between rows, so
  either every row's rejected queries and keys are padded to the widest and run as one call with a
  [rows, 1, R, P + R] mask built once per micro-batch, or each row runs its own call with torch's
  lower-right causal bias. One call keeps a step's launches from growing with the micro-batch (a
  GPU at 7B is launch-bound); the plan pads only where that costs at most PADDED_WORK times the
  per-row arithmetic and a mask of at most PADDED_MASK elements.

Both are fused SDPA calls with no materialised [T, T] mask and no work on the rejected-to-chosen
block, which the 4D-mask path (`layout.attention_bias`) spends. Registered
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
PADDED_WORK = 1.25  # rejected rows run padded in one call if that does at most this times the per-row work
PADDED_MASK = 1 << 23  # ... and its mask has at most this many elements (16 MiB on the device in bf16)


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
    # backward, not a full-size gradient per slice), then one call for all rows or one per row.
    groups = heads // key.shape[1]
    queries = _by_token(query).index_select(0, plan.tail_queries).split([t.rows * t.queries for t in plan.tails])
    keys, values = (
        _grouped(_by_token(states).index_select(0, plan.tail_keys), groups).split([t.rows * t.keys for t in plan.tails])
        for states in (key, value)
    )
    tails = [
        torch.nn.functional.scaled_dot_product_attention(
            _by_row(q, t.rows), _by_row(k, t.rows), _by_row(v, t.rows), attn_mask=t.mask(query),
            dropout_p=dropout, scale=scaling,
        ).transpose(1, 2).flatten(0, 1)  # [rows * R, H, D]
        for t, q, k, v in zip(plan.tails, queries, keys, values, strict=True)
    ]  # fmt: skip
    pieces = torch.cat([head.flatten(0, 1), *tails])  # [B*width + tail queries, H, D]
    return pieces.index_select(0, plan.output).view(batch, length, heads, dim)


def _grouped(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, h, D] key or value heads repeated for the `groups` query heads that share each (GQA);
    without grouping, as they are (repeat_interleave by 1 would still copy them)."""
    return states.repeat_interleave(groups, 1) if groups > 1 else states


def _by_token(states: torch.Tensor) -> torch.Tensor:
    """[B, h, T, D] -> [B*T, h, D], one row per token."""
    return states.transpose(1, 2).flatten(0, 1)


def _by_row(states: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows*N, h, D] -> [rows, h, N, D], sdpa's layout (a view)."""
    return states.unflatten(0, (rows, -1)).transpose(1, 2)


class _Tails(NamedTuple):
    """One sdpa call over rejected rows: `rows` rows of `queries` rejected queries against `keys`
    [prompt | rejected] keys each, under `bias`: torch's lower-right causal bias, or booleans on the
    CPU [rows, 1, queries, K] whose first `keys` columns are the mask (K: `keys` rounded up to 16,
    so each row starts aligned and CUDA's kernels take it without a padded copy)."""

    rows: int
    queries: int
    keys: int
    bias: object

    def mask(self, query: torch.Tensor):
        """The bias as sdpa takes it for `query`: the causal bias as it is, or an additive mask on
        the query's device and in its dtype, made once per micro-batch, not per layer."""
        from torch.nn.attention.bias import CausalBias

        if isinstance(self.bias, CausalBias):
            return self.bias
        return _additive(self.bias, query.dtype, query.device)[..., : self.keys]


@functools.lru_cache(maxsize=2)  # the micro-batch's, in a dtype or two: the only copies on the device
def _additive(visible: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A boolean mask as the additive one sdpa would otherwise build from it in every call."""
    blocked = ~transfer.to_device(visible, device)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


class _Plan(NamedTuple):
    """Index tensors of one micro-batch's shared layout, for every layer of its forward."""

    head_width: int  # the widest prompt + chosen
    tail_queries: torch.Tensor  # flat [B*T] positions of the tails' queries, call after call, row after row
    tail_keys: torch.Tensor  # flat positions of the tails' [prompt | rejected] keys, in the same order
    output: torch.Tensor  # [B*T]: where each position's output lies in [head rows | tails]
    tails: tuple[_Tails, ...]  # the rejected rows' sdpa calls: one padded, or one per row


@functools.lru_cache(maxsize=8)
def layout_plan(
    lengths: tuple[tuple[int, int, int], ...], length: int, device: torch.device, padded: bool | None = None
) -> _Plan:
    """The index tensors and masks of a micro-batch of rows of `length` tokens, one (P, C, R) per row.
    `padded` runs the rejected rows as one call (True), one per row (False), or as `pads` chooses.

    Made before the model's forward and handed to every layer as PLAN_KEY: torch refuses to create
    the masks (tensor subclasses) inside selective checkpointing, which runs the layers' forwards.
    """
    head_width = max(p + c for p, c, _ in lengths)
    tails = [(row, p, c, r) for row, (p, c, r) in enumerate(lengths) if r]
    padded = pads(lengths) if padded is None else padded
    queries = max((r for *_, r in tails), default=0)  # padded: every row's R and P + R are the widest
    keys = max((p + r for _, p, _, r in tails), default=0)
    tail_queries, tail_keys, output = [], [], []
    for row, (p, c, r) in enumerate(lengths):
        output += [row * head_width + t for t in range(p + c)]
        output += [len(lengths) * head_width + len(tail_queries) + j for j in range(r)]
        # padding positions read the row's first output: finite, and never seen by a real token
        output += [row * head_width] * (length - p - c - r)
        if r:  # padded queries and keys read the row's first token (finite, masked or never read)
            start = row * length
            tail_queries += range(start + p + c, start + p + c + r)
            tail_keys += [*range(start, start + p), *range(start + p + c, start + p + c + r)]
            if padded:
                tail_queries += [start] * (queries - r)
                tail_keys += [start] * (keys - p - r)

    def as_index(values: list[int]) -> torch.Tensor:
        return transfer.to_device(torch.tensor(values, dtype=torch.long), device)

    if padded and tails:
        calls = (_Tails(len(tails), queries, keys, _padded_mask(tails, queries, keys)),)
    else:
        from torch.nn.attention.bias import causal_lower_right

        calls = tuple(_Tails(1, r, p + r, causal_lower_right(r, p + r)) for _, p, _, r in tails)
    return _Plan(head_width, as_index(tail_queries), as_index(tail_keys), as_index(output), calls)


def pads(lengths: tuple[tuple[int, int, int], ...]) -> bool:
    """Whether the rejected rows of these (P, C, R) rows run padded as one call: at most PADDED_WORK
    times the per-row calls' query-key products, and a mask of at most PADDED_MASK elements."""
    tails = [(p, r) for p, _, r in lengths if r]
    if len(tails) < 2:
        return False
    padded = len(tails) * max(r for _, r in tails) * max(p + r for p, r in tails)
    return padded <= PADDED_MASK and padded <= PADDED_WORK * sum(r * (p + r) for p, r in tails)


def _padded_mask(tails: list, queries: int, keys: int) -> torch.Tensor:
    """[rows, 1, queries, keys rounded up to 16] booleans: rejected token j of a row sees its P
    prompt keys and its rejected keys 0..j; a padding query sees the row's first key only (a finite
    output, never read)."""
    aligned = -(-keys // 16) * 16
    visible = torch.zeros(len(tails), 1, queries, aligned, dtype=torch.bool)
    for index, (_, p, _, r) in enumerate(tails):
        visible[index, 0, :r, : p + r] = torch.ones(r, p + r, dtype=torch.bool).tril(p)
        visible[index, 0, r:, 0] = True
    return visible


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
