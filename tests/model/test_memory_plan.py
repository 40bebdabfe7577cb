"""`dpo-lora plan` against the bytes a real quantized LoRA step holds, on three architectures."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_lora.core.config import load_config
from dpo_lora.model.fused_lora import fuse
from dpo_lora.model.load import attach_adapter, load_base
from dpo_lora.model.memory_plan import plan
from dpo_lora.model.precision import torch_dtype

from ..conftest import REPO

MICRO, MAX_LENGTH, LAYERS = 2, 24, 3


def architecture(name: str):
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
        "gemma": lambda: GemmaConfig(**common, head_dim=16),
    }[name]()


@pytest.fixture(params=["llama", "qwen2", "gemma"])
def run_config(request, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(architecture(request.param)).save_pretrained(tmp_path / "model")
    return load_config(None, [
        f"model.path={tmp_path / 'model'}", "model.quantization=nf4", "model.dtype=float32", "lora.r=8",
        "lora.dropout=0.05", f"train.micro_batch_size={MICRO}", f"data.max_length={MAX_LENGTH}", "data.max_prompt_length=8",
        f"deepspeed={REPO / 'deepspeed_configs' / 'zero0.json'}",
    ])  # fmt: skip


def storage_bytes(tensors) -> int:
    unique = {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(unique.values())


def quant_state_tensors(weight) -> list[torch.Tensor]:
    state = weight.quant_state
    nested = [state.state2.absmax, state.state2.code, state.offset] if state.nested else []
    return [weight.data, state.absmax, state.code, *nested]


class AttentionOutputs(TorchDispatchMode):
    """Bytes of the outputs of fused attention kernels (output and log-sum-exp) that run inside it."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from dpo_lora.model.grad_checkpointing import ATTENTION_KERNELS

        result = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ATTENTION_KERNELS:
            self.bytes += sum(t.numel() * t.element_size() for t in result[:2])
        return result


def counted_step(config, count_attention_outputs: bool = False, tokens: int = 2 * MAX_LENGTH) -> dict[str, int]:
    """Bytes held by a real policy step at the planned shapes, by component (with
    `count_attention_outputs`, also what the attention kernels return in every layer); rows of
    `tokens` tokens (default: the worst case the plan assumes, 2 x max_length)."""
    import bitsandbytes as bnb

    model = attach_adapter(load_base(config.model, torch.device("cpu")), config.lora)
    if config.model.fused_lora:
        fuse(model, config.model)
    model.train()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    packed = [t for m in quantized for t in quant_state_tensors(m.weight)]
    quantized_ids = {id(m.weight) for m in quantized}
    plain = [p for n, p in model.named_parameters() if "lora_" not in n and id(p) not in quantized_ids]
    params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}

    layers, scope, saved, inputs = model.get_base_model().model.layers, [None], {}, []
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, k, i=index: scope.__setitem__(0, i), with_kwargs=True)
        layer.register_forward_pre_hook(lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]), with_kwargs=True)  # fmt: skip
        layer.register_forward_hook(lambda *_: scope.__setitem__(0, None))

    def pack(tensor):
        key = StorageWeakRef(tensor.untyped_storage())
        if scope[0] == 1 and key not in params:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    rows = MICRO  # rows of the shared-prompt layout the plan chose for these models
    ids = torch.randint(0, 512, (rows, tokens))
    positions = torch.arange(tokens).expand(rows, tokens)
    dtype = torch_dtype(config.model.dtype)  # the additive mask, in the compute dtype as training builds it
    mask = torch.zeros(rows, 1, tokens, tokens, dtype=dtype).masked_fill(
        torch.ones(tokens, tokens).triu(1).bool(), float("-inf")
    )
    kernels = AttentionOutputs() if count_attention_outputs else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernels:
        hidden = (
            model.get_base_model().model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        )
    alive = sum(size for key, size in saved.items() if not key.expired())  # what the backward will need
    hidden.float().square().mean().backward()
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    optimizer.step()
    states = [t for state in optimizer.state.values() for t in state.values() if t.numel() > 1]
    return {
        "4-bit weights + absmax": storage_bytes(packed),
        "unquantized weights (embeddings, head, norms)": storage_bytes(plain),
        "LoRA parameters": storage_bytes(lora),
        "LoRA gradients": storage_bytes([p.grad for p in lora]),
        "optimizer states (AdamW) + ZeRO float32 partition": storage_bytes(states),
        "activations (every layer's saved tensors)": LAYERS * alive,
        "layer input": storage_bytes(inputs[1:2]),
        **({"attention outputs": kernels.bytes} if count_attention_outputs else {}),
    }


def test_each_planned_component_matches_a_real_step_within_two_percent(run_config):
    predicted = plan(run_config).components
    counted = counted_step(run_config)
    assert counted["activations (every layer's saved tensors)"] > 0
    for name, count in counted.items():
        if name in ("layer input", "attention outputs"):
            continue
        assert predicted[name] == pytest.approx(count, rel=0.02), name


@pytest.mark.parametrize("layers", ["peft", "fused", "fused-bf16", "peft-dora"])
def test_planned_activations_in_all_bf16_match_a_real_step(run_config, layers):
    """All bf16, with PEFT's layers, the fused ones, the fused ones with bf16 products (which
    keep the bf16 input, not a float32 copy), and DoRA: the plan counts what a real step keeps."""
    activations = "activations (every layer's saved tensors)"
    model = replace(run_config.model, dtype="bfloat16", float32_residual=False, fused_lora=layers.startswith("fused"),
                    lora_matmul_dtype="bfloat16" if layers == "fused-bf16" else "float32")  # fmt: skip
    config = replace(run_config, model=model, lora=replace(run_config.lora, dora=layers == "peft-dora"))
    counted = counted_step(config)[activations]
    assert plan(config).components[activations] == pytest.approx(counted, rel=0.02)
    if layers == "fused-bf16":
        peft = replace(config, model=replace(model, fused_lora=False, lora_matmul_dtype="float32"))
        assert counted < 0.8 * counted_step(peft)[activations]  # the float32 copies are gone


def test_planned_dora_matches_a_real_step_and_costs_more_than_lora(run_config):
    """DoRA keeps each adapted layer's base output for its magnitude's gradient; what it saves for
    a graph it drops (B @ A through an identity, detached) is gone before the backward."""
    dora = replace(run_config, lora=replace(run_config.lora, dora=True))
    predicted, counted = plan(dora).components, counted_step(dora)
    for name in ("activations (every layer's saved tensors)", "LoRA parameters", "LoRA gradients"):
        assert predicted[name] == pytest.approx(counted[name], rel=0.02), name
    lora = plan(run_config).components["activations (every layer's saved tensors)"]
    assert predicted["activations (every layer's saved tensors)"] > 1.2 * lora


def test_a_plan_at_shorter_rows_matches_a_real_step_at_that_length(run_config):
    from dpo_lora.model.memory_plan import RowLengths

    assert plan(run_config, lengths=RowLengths.worst_case(MAX_LENGTH)) == plan(run_config)
    activations = "activations (every layer's saved tensors)"
    shorter = RowLengths(shared_row=29, unshared_row=20, completion=12)  # prompt 8, completions 12 and 9
    planned = plan(run_config, lengths=shorter)
    assert (planned.rows, planned.tokens_per_row) == (MICRO, 29)
    counted = counted_step(run_config, tokens=29)[activations]
    assert planned.components[activations] == pytest.approx(counted, rel=0.02)
    assert counted < 0.7 * plan(run_config).components[activations]  # 29 of 48 tokens: the comparison bites
    # Rows padded to a multiple of 16 are 32 tokens wide: the plan counts the padding a real step computes.
    padded_config = replace(run_config, train=replace(run_config.train, pad_to_multiple_of=16))
    padded = plan(padded_config, lengths=shorter)
    assert padded.tokens_per_row == 32
    assert padded.components[activations] == pytest.approx(counted_step(run_config, tokens=32)[activations], rel=0.02)


def test_data_lengths_are_the_longest_tokenized_pair_within_max_length(tiny_model_dir, tmp_path):
    import json

    from dpo_lora.model.memory_plan import data_lengths

    rows = [
        {"prompt": "a b", "chosen": " c d e", "rejected": " f"},
        {"prompt": "g h i j", "chosen": " k", "rejected": " l m n o p q"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(None, [f"model.path={tiny_model_dir}", f"data.train={path}", "data.max_length=64"])
    from dpo_lora.data.prepare import tokenized_split
    from dpo_lora.model.load import load_tokenizer

    dataset, _ = tokenized_split(str(path), load_tokenizer(config.model), config.data)
    prompt, chosen, rejected = (
        [len(ids) for ids in dataset[name]] for name in ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    lengths = data_lengths(config)
    assert lengths.shared_row == max(p + c + r for p, c, r in zip(prompt, chosen, rejected, strict=True))
    assert lengths.unshared_row == max(p + max(c, r) for p, c, r in zip(prompt, chosen, rejected, strict=True))
    assert lengths.completion == max(chosen + rejected)
    assert lengths.shared_row > lengths.unshared_row > lengths.completion > 0
    # Truncated as training truncates: a max_length shorter than the pairs bounds every row.
    short = load_config(
        None, [f"model.path={tiny_model_dir}", f"data.train={path}", "data.max_length=6", "data.max_prompt_length=3"]
    )
    clipped = data_lengths(short)
    assert clipped.unshared_row <= 6 and clipped.shared_row <= 12 and clipped.shared_row < lengths.shared_row


def test_checkpointing_keeps_layer_inputs_and_one_layer_and_zero_splits_optimizer_state(run_config):
    from dataclasses import replace

    whole = plan(run_config).components
    checkpointed = replace(run_config, model=replace(run_config.model, gradient_checkpointing=True))
    parts = plan(checkpointed).components
    assert "kept attention outputs" not in parts  # the default recomputes attention too
    assert parts["one-layer recompute peak"] * LAYERS == whole["activations (every layer's saved tensors)"]
    layer_input = counted_step(run_config)["layer input"]
    assert parts["checkpointed activations (layer inputs)"] == LAYERS * layer_input
    keeping = replace(checkpointed, model=replace(checkpointed.model, recompute_attention=False))
    kept = counted_step(run_config, count_attention_outputs=True)["attention outputs"]
    assert plan(keeping).components["kept attention outputs"] == pytest.approx(kept, rel=0.02)
    zero3 = replace(keeping, deepspeed=str(REPO / "deepspeed_configs" / "zero3.json"))
    assert "kept attention outputs" not in plan(zero3).components  # ZeRO-3 recomputes attention
    zero2 = replace(run_config, deepspeed=str(REPO / "deepspeed_configs" / "zero2.json"))
    on_four = plan(zero2, world_size=4).components
    optimizer = "optimizer states (AdamW) + ZeRO float32 partition"
    # A quarter of the AdamW states, plus the float32 partition ZeRO steps (a quarter of the parameters).
    assert on_four[optimizer] == pytest.approx((whole[optimizer] + whole["LoRA parameters"]) / 4, rel=0.01)
    offload = replace(run_config, deepspeed=str(REPO / "deepspeed_configs" / "zero2_offload.json"))
    assert plan(offload).components[optimizer] == 0


def test_plan_command_json_for_a_70b_config_without_weights(tmp_path, capsys):
    import json

    from transformers import LlamaConfig

    from dpo_lora.cli import main

    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000).save_pretrained(tmp_path / "llama-70b")  # fmt: skip
    assert not list((tmp_path / "llama-70b").glob("*.safetensors")), "config.json only"
    args = ["plan", f"model.path={tmp_path / 'llama-70b'}", "model.gradient_checkpointing=true", "data.max_length=512"]
    assert main([*args, "--json", "--gpu-memory", "24GiB"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert small["total_bytes"] == sum(small["components"].values()) and small["fits"] is False
    # 69B parameters in NF4: ~0.5 byte each plus the absmax, the embeddings and head in bf16.
    assert 33e9 < small["components"]["4-bit weights + absmax"] < 37e9
    # Nothing fits beside the whole base; the same GPU fits with the parameters on the host.
    assert small["largest_micro_batch_size"] == 0
    # (The default micro-batch of 4 drops to 1 first: the same batch through accumulation.)
    assert "train.micro_batch_size=1" in small["recommendation"]
    assert "deepspeed=deepspeed_configs/zero3_offload.json" in small["recommendation"]
    assert main([*args, "--json", "--gpu-memory", "80GiB"]) == 0
    large = json.loads(capsys.readouterr().out)
    assert large["fits"] is True and large["largest_micro_batch_size"] >= 4
    assert large["total_bytes"] == small["total_bytes"]
    # 80 GiB holds some layers' activations too: recomputing them buys nothing, and auto plans that.
    fewest = int(large["recommendation"].split("model.checkpoint_layers=")[1].split()[0])
    assert 0 < fewest < 80 and "skip the recompute" in large["recommendation"]
    assert main([*args, "model.checkpoint_layers=auto", "--json", "--gpu-memory", "80GiB"]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert large["total_bytes"] < auto["total_bytes"] <= 80 * 2**30 and auto["recommendation"] is None
    assert auto["components"]["activations of the layers not checkpointed"] > 0
    assert f"({auto['total_bytes'] / 2**30:.2f} GiB)" in large["recommendation"]
    assert (auto["checkpoint_layers"], large["checkpoint_layers"]) == (fewest, "all")
    assert main([*args, "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: cannot read 'lots'" in capsys.readouterr().err


def test_plan_command_with_data_plans_the_longest_pair_too(tiny_model_dir, capsys):
    import json

    from dpo_lora.cli import main

    from ..conftest import SENTIMENT_TRAIN

    args = ["plan", f"model.path={tiny_model_dir}", f"data.train={SENTIMENT_TRAIN}", "data.max_length=512"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_total_bytes"] is None  # only when asked: it tokenizes
    assert main([*args, "--json", "--data"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert 0 < planned["data_total_bytes"] < planned["total_bytes"]  # the test pairs are far below 512 tokens
    assert main([*args, "--data"]) == 0
    assert f"at {SENTIMENT_TRAIN}'s longest pair" in capsys.readouterr().out


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors created inside the block and still alive, op by op; the storages of
    `existing` (made before the block, seen again through views) are not counted."""

    def __init__(self, existing=()) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.existing = {StorageWeakRef(t.untyped_storage()) for t in existing}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [ref for ref in self.live if ref.expired()]:
            del self.live[ref]
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and StorageWeakRef(tensor.untyped_storage()) not in self.existing:
                self.live.setdefault(StorageWeakRef(tensor.untyped_storage()), tensor.untyped_storage().nbytes())
        self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "tokens", "hidden", "vocab", "chunk"), [(2, 200, 64, 3000, 128), (2, 512, 64, 8000, 64)]
)
def test_lm_head_transient_is_within_ten_percent_of_the_live_bytes(dtype, rows, tokens, hidden, vocab, chunk):
    from dpo_lora.model.chunked_logps import label_logps_at
    from dpo_lora.model.memory_plan import lm_head_transient

    states = torch.randn(rows, tokens, hidden, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, hidden, dtype=dtype)
    index = torch.arange(0, rows * tokens, 2)
    with LiveBytes(existing=(states, weight)) as counter:
        logps = label_logps_at(states, weight, None, index, torch.randint(0, vocab, index.shape), chunk)
        logps.sum().backward()
    predicted = lm_head_transient(chunk, vocab, len(index), rows * tokens, hidden, states.element_size())
    assert predicted == pytest.approx(counter.peak, rel=0.10)


def test_plan_says_when_the_run_fits_without_gradient_checkpointing(run_config):
    from dataclasses import replace

    from dpo_lora.model.fitting import checkpointing_hint

    checkpointed = replace(run_config, model=replace(run_config.model, gradient_checkpointing=True))
    unchecked = replace(run_config, model=replace(run_config.model, gradient_checkpointing=False))
    planned, without = plan(checkpointed), plan(unchecked)
    assert planned.total_bytes < without.total_bytes
    assert checkpointing_hint(checkpointed, planned, without.total_bytes) == (
        f"model.gradient_checkpointing=false also fits ({without.total_bytes / 2**30:.2f} GiB): it skips the "
        "recompute in backward, one of the step's three passes through the layers"
    )
    one = plan(replace(checkpointed, model=replace(checkpointed.model, checkpoint_layers=1)))
    assert without.total_bytes > one.total_bytes > planned.total_bytes
    assert checkpointing_hint(checkpointed, planned, without.total_bytes - 1) == (
        f"model.checkpoint_layers=1 also fits ({one.total_bytes / 2**30:.2f} GiB): the other {LAYERS - 1} layers "
        "keep their activations and skip the recompute (model.checkpoint_layers=auto picks this on the GPU)"
    )
    two = plan(replace(checkpointed, model=replace(checkpointed.model, checkpoint_layers=2)))
    assert checkpointing_hint(checkpointed, planned, two.total_bytes) is None  # saves only the last layer's recompute
    assert checkpointing_hint(checkpointed, planned, planned.total_bytes - 1) is None  # fits not at all
    assert checkpointing_hint(unchecked, without, 2**40) is None  # nothing to turn off


def test_zero3s_gathered_set_counts_what_the_reuse_distance_and_the_prefetch_keep():
    """DeepSpeed keeps a gathered parameter whose next use is within `stage3_max_reuse_distance`
    elements, and with a prefetch bucket every layer (from the second step on, gradient
    checkpointing's recompute being each layer's next use): on two CPU ranks a 13B was OOM-killed
    at 11.6 GiB of anonymous memory per rank against 3.66 GiB of partitioned parameters. The
    shipped configs set 50M and no prefetch, and the plan counts whichever applies."""
    from dpo_lora.core.dsconfig import zero_config
    from dpo_lora.model.weight_plan import BaseTensor, ZeroSettings, gathered_working_set

    layers = [BaseTensor(stored=40_000_000, element=4, absmax=0, stats=0, quantized=True) for _ in range(40)]
    head = BaseTensor(stored=160_000_000, element=4, absmax=0, stats=0, quantized=False)
    everything = (40 * 40_000_000 + 160_000_000) * 4
    shipped = ZeroSettings.of(zero_config(3)["zero_optimization"])
    assert (shipped.reuse_distance, shipped.prefetch_bucket) == (50_000_000, 0)
    largest = 160_000_000 * 4
    assert gathered_working_set([*layers, head], shipped) == largest + 50_000_000 * 4
    reuse_only = ZeroSettings.of({"stage": 3, "stage3_prefetch_bucket_size": 0})  # DeepSpeed's 1e9 distance
    assert gathered_working_set([*layers, head], reuse_only) == largest + 1_000_000_000 * 4
    prefetching = ZeroSettings.of({"stage": 3, "stage3_max_reuse_distance": 50_000_000})  # DeepSpeed's 50M bucket
    assert gathered_working_set([*layers, head], prefetching) == largest + everything
    for name in ("zero3.json", "zero3_offload.json"):  # the shipped files say what zero_config says
        shipped_file = json.loads((REPO / "deepspeed_configs" / name).read_text())["zero_optimization"]
        assert shipped_file["stage3_max_reuse_distance"] == 50_000_000
        assert shipped_file["stage3_prefetch_bucket_size"] == 0
