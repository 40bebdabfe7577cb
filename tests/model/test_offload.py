"""Activation offloading: what it moves, that it moves every checkpointed layer's input, that the
gradients do not change, and what the plan and the config say of it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dpo_lora.core.config import load_config
from dpo_lora.core.errors import UserError
from dpo_lora.core.schema import LoraConfig, ModelConfig
from dpo_lora.model import offload
from dpo_lora.model.load import attach_adapter, load_base
from dpo_lora.model.memory_plan import plan

from ..conftest import REPO

CPU = torch.device("cpu")
ROWS, TOKENS = 2, 10


@pytest.fixture
def cpu_as_accelerator(monkeypatch):
    """The CPU counted as an accelerator, so that the copies run here (host copies of host tensors)."""
    monkeypatch.setattr(offload, "HOST", "nowhere")
    monkeypatch.setattr(offload, "MIN_BYTES", 0)


def step(model_dir, on_load=None, **model_options):
    """(LoRA gradients, bytes offloaded, the base model) of one forward and backward of a 4-bit LoRA model."""
    torch.manual_seed(0)
    config = ModelConfig(path=str(model_dir), quantization="nf4", dtype="float32", **model_options)
    base = load_base(config, CPU)
    if on_load is not None:
        on_load(base)
    model = attach_adapter(base, LoraConfig(dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # make the adapter change the function
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, getattr(base, "dpo_lora_offloaded_bytes", None), base


@pytest.mark.parametrize("recompute_attention", [True, False])
def test_every_checkpointed_layer_input_goes_to_the_host_and_the_gradients_stay(
    tiny_model_dir, monkeypatch, cpu_as_accelerator, recompute_attention
):
    """The hooks, run here with the CPU as the "device", take each checkpointed layer's input (torch's
    checkpoint saves it outside its own hooks), and the LoRA gradients are the non-offloaded run's, bit
    for bit; selective checkpointing's kept attention outputs stay in checkpoint's cache."""
    options = {"gradient_checkpointing": True, "recompute_attention": recompute_attention}
    expected, _, _ = step(tiny_model_dir, **options)
    moved, inputs, real = set(), [], offload.moves

    def recording(tensor, min_bytes):
        if real(tensor, min_bytes):
            moved.add(tensor.data_ptr())
            return True
        return False

    monkeypatch.setattr(offload, "moves", recording)
    grads, offloaded, base = step(
        tiny_model_dir, offload_activations=True, **options, on_load=lambda base: watch_inputs(base, inputs)
    )
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, expected[name]), name
    assert len(inputs) == base.config.num_hidden_layers and set(inputs) <= moved
    assert offloaded >= len(inputs) * ROWS * TOKENS * base.config.hidden_size * 4


def watch_inputs(base, into: list) -> None:
    """Record the storage of each decoder layer's input as the forward enters it."""
    for layer in base.model.layers:
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs: into.append((args[0] if args else kwargs["hidden_states"]).data_ptr()),
            with_kwargs=True,
        )


def test_only_activations_on_an_accelerator_of_at_least_min_bytes_move():
    big = torch.empty(1 << 18, device="meta")  # 1 MiB of float32
    weight = torch.nn.Parameter(torch.empty(1 << 18, device="meta"))
    assert offload.moves(big, offload.MIN_BYTES)
    assert not offload.moves(big[:1000], offload.MIN_BYTES)  # under the threshold
    assert not offload.moves(weight, 0) and not offload.moves(weight.view(512, 512).t(), 0)  # a weight, or a view
    assert not offload.moves(torch.empty(1 << 18), 0)  # on a CPU there is nowhere else to go


def test_the_copies_round_trip_and_the_reference_forward_saves_nothing(cpu_as_accelerator):
    x = torch.randn(64, 64, requires_grad=True)
    hooks = offload.OffloadSaved(min_bytes=0)
    with hooks:
        y = x.sin().sum()
    assert hooks.offloaded_bytes == 64 * 64 * 4  # x, what sin saves
    (grad,) = torch.autograd.grad(y, x)
    assert torch.equal(grad, x.detach().cos())

    module = torch.nn.Linear(64, 64)
    offload.install(module, min_bytes=0)
    with torch.no_grad():
        module(x)
    assert module.dpo_lora_offloaded_bytes == 0  # the reference pass: no graph, nothing saved


def config_with(*overrides):
    return load_config(REPO / "configs" / "demo.yaml", ["model.gradient_checkpointing=true", *overrides])


def test_the_plan_moves_the_layer_inputs_to_the_host_but_one(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    AutoModelForCausalLM.from_config(model_config).save_pretrained(tmp_path / "model")
    kept = config_with(
        f"model.path={tmp_path / 'model'}", "model.dtype=float32", "data.max_length=64", "data.max_prompt_length=32"
    )
    offloaded = replace(kept, model=replace(kept.model, offload_activations=True))
    on_device, moved = plan(kept), plan(offloaded)
    inputs = on_device.components["checkpointed activations (layer inputs)"]
    assert moved.host["offloaded layer inputs (model.offload_activations)"] == inputs
    assert moved.components["one layer's input, back for its recompute"] == inputs // 3
    assert on_device.total_bytes - moved.total_bytes == inputs - inputs // 3
    assert moved.host_bytes - on_device.host_bytes == inputs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.gradient_checkpointing=false"], "set model.gradient_checkpointing: true"),
        (["model.checkpoint_layers=3"], "set model.checkpoint_layers: all"),
    ],
)
def test_settings_offloading_cannot_work_with_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=f"'model.offload_activations' .*{message}"):
        config_with("model.offload_activations=true", *overrides)
