"""Model loading: the reference is the base with the adapter off, and 4-bit gradients are right."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dpo_lora.core.errors import UserError
from dpo_lora.core.schema import LoraConfig, ModelConfig
from dpo_lora.model.load import POLICY_ADAPTER, attach_adapter, load_base, reference_mode

CPU = torch.device("cpu")


def policy(model_dir, quantization="nf4", init_adapter=None, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model_config = ModelConfig(path=str(model_dir), quantization=quantization, dtype="float32")
    model = attach_adapter(load_base(model_config, CPU), LoraConfig(dropout=dropout, init_adapter=init_adapter))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # make the adapter change the function
            torch.nn.init.normal_(p, std=0.05)
    return model


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_reference_mode_is_the_base_without_adapter(tiny_model_dir, quantization):
    model = policy(tiny_model_dir, quantization)
    base = load_base(ModelConfig(path=str(tiny_model_dir), quantization=quantization, dtype="float32"), CPU)
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        with_adapter = model(input_ids=x).logits
        with reference_mode(model):
            reference = model(input_ids=x).logits
        plain = base(input_ids=x).logits
    torch.testing.assert_close(reference, plain)
    assert not torch.allclose(with_adapter, plain), "the adapter must change the policy"
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in base.parameters()) + 2 * sum(
        1 for n, _ in model.named_parameters() if "lora_A" in n
    ), "the reference must not hold a second copy of the base"


def dequantized_float_twin(model):
    """A float32 copy of `model` whose quantized weights are replaced by their dequantization."""
    import bitsandbytes as bnb

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[name + ".weight"] = weight.float()
    return state


def test_lora_gradients_through_4bit_layers_match_dequantized_float_model(tiny_model_dir):
    model = policy(tiny_model_dir, "nf4")
    x = tokens(model.config.vocab_size, seed=1)
    # One eval forward first: bitsandbytes used to repack weights then and drop input gradients.
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    model.train()
    model(input_ids=x).logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    twin = policy(tiny_model_dir, "none")
    dequantized = dequantized_float_twin(model)
    with torch.no_grad():
        for name, module in twin.named_modules():
            if name + ".weight" in dequantized:
                module.weight.copy_(dequantized[name + ".weight"])
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for n, p in twin.named_parameters():
            if n in lora:
                p.copy_(lora[n])
    twin(input_ids=x).logits.logsumexp(-1).sum().backward()
    assert len(grads) > 0
    for name, p in twin.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_init_adapter_is_the_reference_and_stays_frozen(tiny_model_dir, tmp_path):
    start = policy(tiny_model_dir, "nf4", seed=3)
    start.save_pretrained(tmp_path / "start")
    model = attach_adapter(
        load_base(ModelConfig(path=str(tiny_model_dir), dtype="float32"), CPU),
        LoraConfig(dropout=0.0, init_adapter=str(tmp_path / "start")),
    )
    x = tokens(model.config.vocab_size, seed=2)
    with torch.no_grad():
        initial = model(input_ids=x).logits
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)  # the policy moves on; the reference must not
        with reference_mode(model):
            reference = model(input_ids=x).logits
        moved = model(input_ids=x).logits
    torch.testing.assert_close(reference, initial)
    assert not torch.allclose(moved, initial)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY_ADAPTER}." in n for n in trainable)


def test_reference_runs_without_dropout_in_a_training_model(tiny_model_dir, tmp_path):
    start = policy(tiny_model_dir, "nf4", seed=3, dropout=0.5)  # the continued adapter's own dropout
    start.save_pretrained(tmp_path / "start")
    model = attach_adapter(
        load_base(ModelConfig(path=str(tiny_model_dir), dtype="float32"), CPU),
        LoraConfig(dropout=0.5, init_adapter=str(tmp_path / "start")),
    )
    model.train()
    x = tokens(model.config.vocab_size, seed=2)
    with torch.no_grad():
        policy_twice = [model(input_ids=x).logits for _ in range(2)]
        assert not torch.equal(*policy_twice), "the policy's LoRA dropout is on in training"
        with reference_mode(model):
            reference_twice = [model(input_ids=x).logits for _ in range(2)]
        assert model.training, "training mode is restored"
        model.eval()
        with reference_mode(model):
            deterministic = model(input_ids=x).logits
    torch.testing.assert_close(reference_twice[0], reference_twice[1], rtol=0, atol=0)
    torch.testing.assert_close(reference_twice[0], deterministic, rtol=0, atol=0)


def test_init_adapter_settings_that_differ_from_the_config_are_named(tiny_model_dir, tmp_path, capsys):
    start = policy(tiny_model_dir, "nf4", seed=3)  # r=16, alpha=32, dropout 0
    start.save_pretrained(tmp_path / "start")
    model = attach_adapter(
        load_base(ModelConfig(path=str(tiny_model_dir), dtype="float32"), CPU),
        LoraConfig(r=8, alpha=32, dropout=0.0, target_modules=["q_proj"], init_adapter=str(tmp_path / "start")),
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("dpo-lora: lora.init_adapter keeps its own settings: lora.r=8 -> 16")
    assert "lora.target_modules=['q_proj'] -> [" in line and "alpha" not in line
    assert model.peft_config[POLICY_ADAPTER].r == 16, "the adapter's own rank is what trains"


def test_missing_model_and_adapter_are_user_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="'model.path': no model at"):
        load_base(ModelConfig(path=str(tmp_path / "nothing")), CPU)
    base = load_base(ModelConfig(path=str(tiny_model_dir), dtype="float32"), CPU)
    with pytest.raises(UserError, match="'lora.init_adapter'"):
        attach_adapter(base, LoraConfig(init_adapter=str(tmp_path)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_4bit_weights_are_stored_in_the_compute_dtype_so_zero3_can_partition_them(dtype):
    from dpo_lora.core.config import load_config
    from dpo_lora.model.precision import quantization_config

    config = quantization_config(load_config(None, ["model.quantization=nf4", f"model.dtype={dtype}"]).model)
    assert config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == getattr(torch, dtype)


def test_auto_attention_is_the_models_choice_and_an_unrunnable_kernel_names_the_key(tiny_model_dir, tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    auto = load_base(ModelConfig(path=str(tiny_model_dir), quantization="none", dtype="float32"), CPU)
    assert auto.config._attn_implementation == "sdpa"
    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)).save_pretrained(
        tmp_path / "bloom"
    )
    bloom = load_base(ModelConfig(path=str(tmp_path / "bloom"), quantization="none", dtype="float32"), CPU)
    expected = "sdpa" if BloomForCausalLM._supports_sdpa else "eager"  # no crash either way
    assert bloom.config._attn_implementation == expected
    with pytest.raises(UserError, match="config key 'model.attn_implementation': 'flash_attention_2' cannot run here"):
        load_base(
            ModelConfig(path=str(tiny_model_dir), quantization="none", attn_implementation="flash_attention_2"), CPU
        )


@pytest.mark.parametrize("float32_residual", [True, False])
def test_float32_residual_keeps_sums_logits_and_lora_in_float32_and_4bit_matmuls_in_bfloat16(
    tiny_model_dir, float32_residual
):
    import bitsandbytes as bnb

    config = ModelConfig(path=str(tiny_model_dir), dtype="bfloat16", float32_residual=float32_residual)
    model = attach_adapter(load_base(config, CPU), LoraConfig(dropout=0.0))
    outer = torch.float32 if float32_residual else torch.bfloat16
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == base.model.norm.weight.dtype == base.lm_head.weight.dtype == outer
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).dtype  # returns None: output unchanged

        return hook

    layer = base.model.layers[0]
    layer.register_forward_hook(record("residual"))
    q_proj = layer.self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.compute_dtype == torch.bfloat16
    lora_a = q_proj.lora_A["default"]
    lora_a.register_forward_hook(record("lora_matmul"))
    exact = []

    def float32_oracle(module, args, out):
        with torch.autocast("cpu", enabled=False):  # the hook runs inside the model's autocast
            exact.append(torch.equal(out, torch.nn.functional.linear(args[0].float(), module.weight)))

    lora_a.register_forward_hook(float32_oracle)
    logits = model(input_ids=tokens(model.config.vocab_size)).logits
    # The adapter's matmuls stay float32 in both modes (autocast would round the adapter to bf16).
    assert seen == {"residual": outer, "lora_matmul": torch.float32} and exact == [True]
    assert logits.dtype == outer
    logits.float().sum().backward()  # through the 4-bit layers and autocast, into the float32 adapter
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]  # lora_A gets none while B is 0
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_float32_residual_applies_to_quantized_bfloat16_bases_only(tiny_model_dir):
    from dpo_lora.model.precision import weights_dtype

    def dtype_of(**keys):
        return weights_dtype(ModelConfig(path=str(tiny_model_dir), **{"float32_residual": True, **keys}))

    assert dtype_of(dtype="bfloat16", quantization="nf4") == torch.float32
    assert dtype_of(dtype="bfloat16", quantization="int8") == torch.float32
    assert dtype_of(dtype="bfloat16", quantization="none") == torch.bfloat16  # the whole base would double
    assert dtype_of(dtype="float16", quantization="nf4") == torch.float16  # DeepSpeed's fp16 mode casts the model
    assert dtype_of(dtype="bfloat16", quantization="nf4", float32_residual=False) == torch.bfloat16


@pytest.mark.parametrize("native_cpu", [True, False])
def test_float32_residual_auto_is_all_bf16_where_bf16_is_native_and_only_true_false_auto(
    tiny_model_dir, monkeypatch, native_cpu
):
    from dpo_lora.core.config import load_config
    from dpo_lora.model import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_cpu)  # AMX/AVX512-BF16 or not
    config = ModelConfig(path=str(tiny_model_dir), dtype="bfloat16")
    assert config.float32_residual == "auto"
    assert precision.bf16_is_native("cuda") and precision.bf16_is_native("cpu") is native_cpu
    assert precision.resolved(config, bf16_native=True).float32_residual is False
    assert precision.resolved(config, bf16_native=False).float32_residual is True
    assert precision.resolved(replace(config, float32_residual=True), bf16_native=True).float32_residual  # as set
    assert precision.float32_residual(config) is False  # unresolved, it reads as on a GPU: what plans are for
    # load_base resolves for the device it loads on: float32 outside the 4-bit matmuls where bf16 is emulated
    embeddings = load_base(config, CPU).model.embed_tokens.weight.dtype
    assert embeddings == (torch.bfloat16 if native_cpu else torch.float32)
    for value in ("true", "false", "auto"):
        load_config(None, [f"model.float32_residual={value}"])
    with pytest.raises(UserError, match="'model.float32_residual' must be true, false or auto; got 'fp32'"):
        load_config(None, ["model.float32_residual=fp32"])


def test_the_float32_head_survives_the_chunked_head_being_removed(tiny_model_dir):
    from dpo_lora.model import chunked_logps

    config = ModelConfig(path=str(tiny_model_dir), dtype="bfloat16", float32_residual=True)
    model = attach_adapter(load_base(config, CPU), LoraConfig(dropout=0.0))
    assert chunked_logps.install(model, 4)
    chunked_logps.uninstall(model)  # what the self-check does where the chunked head is wrong
    with torch.no_grad():
        assert model(input_ids=tokens(model.config.vocab_size)).logits.dtype == torch.float32


@pytest.mark.parametrize("float32_residual", [True, False])
def test_the_head_multiplies_a_sliced_hidden_state_as_one_matrix(tiny_model_dir, float32_residual):
    """`logits_to_keep` hands the head a non-contiguous slice, which torch's matmul would run as a
    batched matmul over copies of the head's weight (_head_reads_contiguous): it must run as one mm,
    with the logits of the whole-sequence forward at those positions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
                self.ops.append((func.overloadpacket.__name__, tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    config = ModelConfig(path=str(tiny_model_dir), dtype="bfloat16", float32_residual=float32_residual)
    model = load_base(config, CPU)
    ids = tokens(model.config.vocab_size).repeat(3, 1)  # [3, T]: a batch, so the slice is strided
    head_shape = tuple(model.get_output_embeddings().weight.shape[::-1])
    with torch.no_grad():
        every = model(input_ids=ids).logits
        with Matmuls() as seen:
            kept = model(input_ids=ids, logits_to_keep=5).logits
    head_ops = [name for name, shape in seen.ops if shape[-2:] == head_shape]
    assert head_ops == ["mm"]
    torch.testing.assert_close(kept, every[:, -5:], rtol=0, atol=0)
