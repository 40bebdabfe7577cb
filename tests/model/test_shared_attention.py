"""Split shared-prompt attention (no dense mask): the attention function against a float64 oracle
written from the visibility rule, and the model on the shared layout against the unshared one in
values and LoRA gradients (sdpa, plain and chunked head, gradient checkpointing, the reference).
The FlexAttention kernel against the same oracle and the same unshared forward: values on the CPU
(torch's FlexAttention has no CPU backward), values and gradients where CUDA is present (the GPU
check runs this file there)."""

from __future__ import annotations

import random
import types

import pytest
import torch

from dpo_lora.data.layout import batch_layout, collate_pairs
from dpo_lora.model import shared_attention
from dpo_lora.train.step import concatenated_logps

from ..data.test_layout import logps_and_grads, lora_model, random_pairs
from ..train.test_loop import tiny_config


def oracle_attention(query, key, value, lengths, scaling):
    """float64, from the rule: in row [prompt | chosen | rejected], a query sees a key iff the key is
    no later and in the prompt or in the query's own branch. query [B, H, T, D], key/value
    [B, Hkv, T, D] -> [B, T, H, D], padding queries 0."""
    query, key, value = query.double(), key.double(), value.double()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    batch, _, length, _ = query.shape
    output = torch.zeros(batch, length, query.shape[1], query.shape[3], dtype=torch.float64)
    for row, (p, c, r) in enumerate(lengths):
        branch = [0] * p + [1] * c + [2] * r
        for q in range(p + c + r):
            visible = [k for k in range(q + 1) if branch[k] in (0, branch[q])]
            scores = (query[row, :, q, None, :] * key[row, :, visible]).sum(-1) * scaling  # [H, K]
            output[row, q] = (scores.softmax(-1)[..., None] * value[row, :, visible]).sum(1)
    return output


def random_problem(seed: int, device: torch.device, requires_grad: bool, kv_heads: int = 2):
    """(lengths, query [3, 4, T, 8], key and value [3, kv_heads, T, 8], real [3, T]) of random rows."""
    rng = random.Random(seed)
    lengths = [(rng.randint(1, 7), rng.randint(0, 6), rng.randint(0, 6)) for _ in range(3)]
    length = max(sum(row) for row in lengths) + rng.randint(0, 2)  # right padding
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (
        torch.randn(3, heads, length, 8, generator=generator).to(device).requires_grad_(requires_grad)
        for heads in (4, kv_heads, kv_heads)  # 4 // kv_heads query heads per KV head
    )
    real = torch.zeros(3, length, dtype=torch.bool)
    for row, total in enumerate(sum(row) for row in lengths):
        real[row, :total] = True
    return lengths, query, key, value, real


@pytest.mark.parametrize("padded", [True, False], ids=["rejected-in-one-call", "rejected-per-row"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_attention_equals_the_float64_oracle_in_values_and_gradients(seed, kv_heads, padded):
    """On CUDA where present (the GPU check runs this file): there the padded rows' mask goes to
    the memory-efficient kernel, the per-row causal bias to flash."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths, query, key, value, real = random_problem(seed, device, requires_grad=True, kv_heads=kv_heads)
    module = types.SimpleNamespace(num_key_value_groups=4 // kv_heads, is_causal=True, training=False)
    plan = shared_attention.layout_plan(tuple(lengths), query.shape[2], query.device, padded)
    assert len(plan.tails) == (1 if padded else sum(r > 0 for *_, r in lengths))
    kwargs = {shared_attention.PLAN_KEY: plan}
    got, _ = shared_attention.shared_prompt_attention(module, query, key, value, None, scaling=0.3, **kwargs)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (query, key, value)]
    want = oracle_attention(*leaves, lengths, scaling=0.3)
    torch.testing.assert_close(got.cpu()[real].double(), want[real].detach(), rtol=1e-5, atol=1e-6)

    weights = torch.randn(got.shape) * real[:, :, None, None]  # a loss over the real positions only
    got_grads = torch.autograd.grad((got * weights.to(device)).sum(), (query, key, value))
    want_grads = torch.autograd.grad((want * weights.double()).sum(), leaves)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-5, msg=name)


def test_rejected_rows_run_in_one_call_where_padding_them_costs_little():
    assert shared_attention.pads(((300, 480, 480), (298, 476, 479)))  # a few tokens apart
    assert not shared_attention.pads(((300, 480, 480), (300, 480, 0)))  # one rejected row: nothing to batch
    assert not shared_attention.pads(((10, 5, 500), (10, 5, 20), (10, 5, 20)))  # padded work 3x the rows'
    assert not shared_attention.pads(((2000, 10, 2000),) * 3)  # a mask of 3 x 2000 x 4000 elements
    # padded queries and keys read a real token, and padding queries see one key: every output finite
    plan = shared_attention.layout_plan(((1, 0, 1), (2, 1, 3)), 8, torch.device("cpu"), padded=True)
    (tails,) = plan.tails
    assert (tails.rows, tails.queries, tails.keys) == (2, 3, 5)
    mask = tails.mask(torch.zeros(1))
    assert mask.shape == (2, 1, 3, 5) and mask.dtype == torch.float32
    assert mask.isfinite().any(-1).all() and mask.stride(-2) == 16  # aligned rows, as CUDA's kernels take them
    assert tails.mask(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flex_attention_equals_the_float64_oracle(seed):
    """Values everywhere; gradients on CUDA (FlexAttention's backward exists only there)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grads = device.type == "cuda"
    lengths, query, key, value, real = random_problem(seed, device, requires_grad=grads)
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    kwargs = {shared_attention.PLAN_KEY: shared_attention.flex_plan(tuple(lengths), query.shape[2], device)}
    with torch.set_grad_enabled(grads):
        got, _ = shared_attention.flex_shared_prompt_attention(module, query, key, value, None, scaling=0.3, **kwargs)
    got = got.cpu()
    want = oracle_attention(query.detach().cpu(), key.detach().cpu(), value.detach().cpu(), lengths, scaling=0.3)
    torch.testing.assert_close(got[real].double(), want[real], rtol=1e-5, atol=1e-6)
    assert got[~real].isfinite().all()  # padding reads its row's prompt: finite, unread by real tokens
    if grads:
        weights = torch.randn(got.shape) * real[:, :, None, None]
        got_grads = torch.autograd.grad((got * weights).sum(), (query, key, value))
        leaves = [t.detach().cpu().double().requires_grad_() for t in (query, key, value)]
        want_out = oracle_attention(*leaves, lengths, scaling=0.3)
        want_grads = torch.autograd.grad((want_out * weights.double()).sum(), leaves)
        for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
            torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-5, msg=name)


def test_flex_is_refused_with_its_reason_where_it_cannot_train():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert shared_attention.flex_unavailable(cuda, 0.0) is None
    assert "no backward on the CPU" in shared_attention.flex_unavailable(cpu, 0.0)
    assert "attention dropout (the model's is 0.1)" in shared_attention.flex_unavailable(cuda, 0.1)
    lengths, query, key, value, _ = random_problem(0, cpu, requires_grad=False)
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)
    kwargs = {shared_attention.PLAN_KEY: shared_attention.flex_plan(tuple(lengths), query.shape[2], cpu)}
    with pytest.raises(ValueError, match="no dropout"):
        shared_attention.flex_shared_prompt_attention(module, query, key, value, None, 0.1, **kwargs)


def test_without_the_layouts_lengths_it_is_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[1, :, :, 6:] = False  # padding
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    got, _ = shared_attention.shared_prompt_attention(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("chunk_size", "checkpointing", "padded"),
    [
        (0, None, True),
        (0, None, False),
        (5, None, True),
        (0, "recompute attention", True),
        (0, "keep attention", False),
    ],
)
def test_split_shared_forward_equals_unshared_in_values_and_lora_gradients(
    tiny_model_dir, tiny_tokenizer, monkeypatch, request, chunk_size, checkpointing, padded
):
    from dpo_lora.core.schema import ModelConfig
    from dpo_lora.model import chunked_logps
    from dpo_lora.model.grad_checkpointing import checkpoint_options
    from dpo_lora.model.load import reference_mode

    shared_attention.layout_plan.cache_clear()  # plans made with the choice forced here stay here
    request.addfinalizer(shared_attention.layout_plan.cache_clear)
    monkeypatch.setattr(shared_attention, "pads", lambda lengths: padded)
    model = lora_model(tiny_model_dir, "sdpa")
    if chunk_size:
        assert chunked_logps.install(model, chunk_size)
    if checkpointing:  # the recompute in backward must see the same layout
        options = checkpoint_options(ModelConfig(recompute_attention=checkpointing == "recompute attention"))
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        model.train()
    features = random_pairs(6, len(tiny_tokenizer), seed=10 + chunk_size)
    unshared = collate_pairs(features, tiny_tokenizer.pad_token_id)
    shared = collate_pairs(features, tiny_tokenizer.pad_token_id, share_prompt=True)
    want = logps_and_grads(model, unshared)
    shared_attention.use_on(model)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    got = logps_and_grads(model, shared)
    assert model.config._attn_implementation == shared_attention.KERNEL and calls

    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Unshared batches on the switched model are sdpa's; the reference (adapter off) matches too.
    torch.testing.assert_close(logps_and_grads(model, unshared)[0], want[0], rtol=0, atol=0)
    with torch.no_grad(), reference_mode(model):
        torch.testing.assert_close(
            concatenated_logps(model, shared)[0], concatenated_logps(model, unshared)[0], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    ("kernel", "choice", "switched"),
    [("sdpa", "split", True), ("sdpa", "mask", False), ("eager", "split", False), ("sdpa", "flex", True)],
)  # eager keeps the 4D mask; flex on the CPU runs split, saying why
def test_the_layout_switches_sdpa_models_to_split_attention_unless_told_mask(
    tiny_model_dir, tmp_path, kernel, choice, switched
):
    model = lora_model(tiny_model_dir, kernel)
    config = tiny_config("unused", tmp_path, f"train.shared_prompt_attention={choice}")
    collate, notices = batch_layout(config, model, pad_token_id=0)
    assert collate.keywords["share_prompt"]
    assert (model.config._attn_implementation == shared_attention.KERNEL) == switched
    flex_refused = ["train.shared_prompt_attention: split, not flex: torch's FlexAttention has no backward on the CPU"]
    assert notices == (flex_refused if choice == "flex" else [])


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_flex_shared_forward_equals_unshared_without_grad_on_the_cpu(
    tiny_model_dir, tiny_tokenizer, monkeypatch, chunk_size
):
    """The model switched to FLEX_KERNEL by hand (the layout refuses it for training on the CPU):
    its block mask, positions and scoring give the unshared log-probs, adapter on and off."""
    from dpo_lora.model import chunked_logps
    from dpo_lora.model.load import reference_mode

    model = lora_model(tiny_model_dir, "sdpa")
    if chunk_size:
        assert chunked_logps.install(model, chunk_size)
    features = random_pairs(6, len(tiny_tokenizer), seed=20 + chunk_size)
    unshared = collate_pairs(features, tiny_tokenizer.pad_token_id)
    shared = collate_pairs(features, tiny_tokenizer.pad_token_id, share_prompt=True)
    with torch.no_grad():
        want = concatenated_logps(model, unshared)[0]
        with reference_mode(model):
            want_reference = concatenated_logps(model, unshared)[0]
        shared_attention.use_on(model, "flex")
        assert model.config._attn_implementation == shared_attention.FLEX_KERNEL
        calls, flex = [], shared_attention._flex_attention()
        counted = lambda *args, **kwargs: calls.append(1) or flex(*args, **kwargs)  # noqa: E731
        monkeypatch.setattr(shared_attention, "_flex_attention", lambda: counted)
        torch.testing.assert_close(concatenated_logps(model, shared)[0], want, rtol=1e-5, atol=1e-5)
        with reference_mode(model):
            torch.testing.assert_close(concatenated_logps(model, shared)[0], want_reference, rtol=1e-5, atol=1e-5)
        # unshared batches on the switched model run sdpa, unchanged
        layers = len(calls) // 2
        assert torch.equal(concatenated_logps(model, unshared)[0], want)
    assert layers == model.config.num_hidden_layers and len(calls) == 2 * layers  # one call a layer, shared only


def test_compiled_flex_attention_does_not_recompile_for_new_lengths_in_a_batch_of_the_same_shape():
    """The GPU path compiles flex_attention once per process. Each batch brings a new block mask
    whose mask_mod reads that batch's lengths: those must be inputs to the compiled graph, not
    constants it guards on, or every batch would compile again (seconds each)."""
    from torch._dynamo.utils import counters

    compiled = shared_attention._compiled_flex_attention()
    cpu = torch.device("cpu")
    graphs = []
    for seed in (0, 1):  # same shapes, different rows
        lengths, query, key, value, real = random_problem(seed, cpu, requires_grad=False)
        length = 24  # both problems padded to one width
        query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2])) for t in (query, key, value))
        block_mask = shared_attention.flex_plan(tuple(lengths), length, cpu)
        with torch.no_grad():
            got = compiled(query, key, value, block_mask=block_mask, scale=0.3, enable_gqa=True)
        want = oracle_attention(query, key, value, lengths, scaling=0.3)  # [B, T, H, D]
        real = torch.nn.functional.pad(real, (0, length - real.shape[1]))
        torch.testing.assert_close(got.transpose(1, 2)[real].double(), want[real], rtol=1e-5, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] >= 1
