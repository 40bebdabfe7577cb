"""Gradient checkpointing: which layers recompute, what they keep, and `auto`'s choice by the plan."""

from __future__ import annotations

import collections
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_lora.core.config import load_config
from dpo_lora.core.errors import UserError
from dpo_lora.core.schema import LoraConfig, ModelConfig
from dpo_lora.model import fitting
from dpo_lora.model.fitting import fewest_fitting, resolve_auto
from dpo_lora.model.grad_checkpointing import ATTENTION_KERNELS, checkpoint_options
from dpo_lora.model.load import attach_adapter, load_base
from dpo_lora.model.memory_plan import plan

from ..conftest import REPO

CPU = torch.device("cpu")


class KernelCounter(TorchDispatchMode):
    """Counts the aten ops that run. Outermost, it sees only real executions: an op whose output
    selective checkpointing hands back from its cache never reaches it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step(model_dir, **model_options) -> tuple[int, dict[str, torch.Tensor]]:
    """(attention kernel runs, LoRA gradients) of one forward and backward of a 4-bit LoRA model."""
    torch.manual_seed(0)
    config = ModelConfig(path=str(model_dir), quantization="nf4", dtype="float32", **model_options)
    model = attach_adapter(load_base(config, CPU), LoraConfig(dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # make the adapter change the function
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with KernelCounter() as counter:
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    kernel_calls = sum(counter.calls[name] for name in ATTENTION_KERNELS)
    return kernel_calls, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same(grads: dict, expected: dict) -> None:
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, expected[name]), name


def test_checkpointing_keeps_attention_outputs_and_gives_the_same_gradients(tiny_model_dir):
    """Selective checkpointing (model.recompute_attention=false) runs each layer's attention kernel
    once, not again in backward, and the LoRA gradients are those of recomputing everything, bit for bit."""
    recomputing = step(tiny_model_dir, gradient_checkpointing=True, recompute_attention=True)
    keeping = step(tiny_model_dir, gradient_checkpointing=True, recompute_attention=False)
    layers = 2  # tiny_model_dir's
    assert recomputing[0] == 2 * layers and keeping[0] == layers
    assert "context_fn" not in checkpoint_options(
        ModelConfig(recompute_attention=False, gradient_checkpointing=True), 3
    )
    assert_same(keeping[1], recomputing[1])


@pytest.mark.parametrize("count", [0, 1, 2, 7, "all"])
def test_only_the_first_checkpoint_layers_recompute_and_gradients_are_unchanged(tiny_model_dir, count):
    layers = 2
    unchecked_calls, unchecked = step(tiny_model_dir)
    calls, grads = step(tiny_model_dir, gradient_checkpointing=True, checkpoint_layers=count)
    recomputed = layers if count == "all" else min(count, layers)
    assert unchecked_calls == layers and calls == layers + recomputed  # one more attention run per recompute
    assert_same(grads, unchecked)


@pytest.fixture
def three_layer_config(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    AutoModelForCausalLM.from_config(model_config).save_pretrained(tmp_path / "model")
    return load_config(None, [
        f"model.path={tmp_path / 'model'}", "model.dtype=float32", "model.gradient_checkpointing=true",
        "train.micro_batch_size=2", "data.max_length=64", f"deepspeed={REPO / 'deepspeed_configs' / 'zero0.json'}",
    ])  # fmt: skip


def planned_bytes(config, count) -> int:
    return plan(replace(config, model=replace(config.model, checkpoint_layers=count))).total_bytes


def test_each_layer_left_out_adds_its_activations_and_fewest_fitting_bisects_the_plan(three_layer_config):
    by_count = [planned_bytes(three_layer_config, count) for count in range(4)]
    every = plan(three_layer_config).components  # checkpoint_layers: all
    per_layer, layer_input = every["one-layer recompute peak"], every["checkpointed activations (layer inputs)"] // 3
    assert planned_bytes(three_layer_config, "all") == by_count[3] == planned_bytes(three_layer_config, "auto")
    # Each layer left out holds its saved tensors instead of its input; the recompute peak stacks
    # only when every layer checkpoints, so checkpointing the last one too costs one more input.
    assert by_count[0] - by_count[1] == by_count[1] - by_count[2] == per_layer - layer_input > 0
    assert by_count[3] - by_count[2] == layer_input
    partial = plan(replace(three_layer_config, model=replace(three_layer_config.model, checkpoint_layers=1))).components
    assert partial["activations of the layers not checkpointed"] == 2 * per_layer
    assert "one-layer recompute peak" not in partial
    for budget in sorted({size + delta for size in by_count for delta in (-1, 0, 1)}):  # a linear scan is the oracle
        scanned = next((count for count in range(3) if by_count[count] <= budget), 3)
        assert fewest_fitting(three_layer_config, budget) == (scanned, by_count[scanned], 3), budget


def test_auto_takes_the_fewest_layers_that_fit_the_gpu_and_every_layer_on_a_cpu(
    three_layer_config, monkeypatch, capsys
):
    auto = replace(three_layer_config, model=replace(three_layer_config.model, checkpoint_layers="auto"))
    on_cpu = resolve_auto(auto, CPU, world_size=1, announce=True)
    assert on_cpu.model.checkpoint_layers == "all"
    assert "model.checkpoint_layers=auto -> all (auto sizes to GPU memory" in capsys.readouterr().err
    budget = planned_bytes(three_layer_config, 1)
    monkeypatch.setattr(fitting, "device_budget", lambda device: budget)
    on_gpu = resolve_auto(auto, torch.device("cuda", 0), world_size=1, announce=True)
    assert on_gpu.model.checkpoint_layers == 1
    assert f"-> 1 (1 of 3 layers; plan {budget / 2**30:.2f} GiB of" in capsys.readouterr().err
    assert resolve_auto(three_layer_config, torch.device("cuda", 0), 1, True) is three_layer_config  # not auto
    unchecked = replace(auto, model=replace(auto.model, gradient_checkpointing=False))
    assert resolve_auto(unchecked, torch.device("cuda", 0), 1, True) is unchecked
    # Under ZeRO-3 a layer left out would keep its gathered quantized weights on the graph.
    zero3 = replace(auto, deepspeed=str(REPO / "deepspeed_configs" / "zero3.json"))
    assert resolve_auto(zero3, torch.device("cuda", 0), 1, True).model.checkpoint_layers == "all"
    assert "-> all (under ZeRO-3 a layer not checkpointed keeps" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "some", "true", "1.5"])
def test_checkpoint_layers_must_be_all_auto_or_a_count(value):
    with pytest.raises(UserError, match="config key 'model.checkpoint_layers' must be all, auto or a count >= 0"):
        load_config(None, [f"model.checkpoint_layers={value}"])


def test_real_peak_falls_with_each_checkpointed_layer_but_the_last_as_the_plan_has_it(three_layer_config):
    """The bisection's premise, on live bytes: each checkpointed layer lowers a step's peak, except
    the last, whose recompute runs while every checkpointed input is still held."""
    from .test_memory_plan import LiveBytes

    peaks, planned = [], []
    rows, tokens = 2, 48
    for count in range(4):
        config = replace(three_layer_config, model=replace(three_layer_config.model, checkpoint_layers=count))
        model = attach_adapter(load_base(config.model, CPU), config.lora)
        model.train()
        ids = torch.randint(0, 512, (rows, tokens), generator=torch.Generator().manual_seed(0))
        with LiveBytes(existing=[*model.parameters(), ids]) as counter:
            model.get_base_model().model(input_ids=ids).last_hidden_state.square().mean().backward()
        peaks.append(counter.peak)
        planned.append(planned_bytes(config, count))
    assert peaks[0] > peaks[1] > peaks[2] == peaks[3]
    assert planned[0] > planned[1] > planned[2] and planned[3] > planned[2]  # the plan keeps one input spare at all
