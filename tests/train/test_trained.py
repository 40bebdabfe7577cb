"""Loading a finished run: the policy and, for a continued adapter, the reference it trained against."""

from __future__ import annotations

import torch

from dpo_lora.core.schema import LoraConfig, ModelConfig
from dpo_lora.model.load import attach_adapter, load_base, reference_mode
from dpo_lora.train.trained import load_policy

CPU = torch.device("cpu")


def saved_adapter(model_dir, folder, seed: int):
    torch.manual_seed(seed)
    model = attach_adapter(load_base(ModelConfig(path=str(model_dir), dtype="float32"), CPU), LoraConfig(dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(folder)
    return model.eval()


def test_a_continued_run_is_loaded_with_its_init_adapter_as_the_reference(tiny_model_dir, tmp_path):
    start = saved_adapter(tiny_model_dir, tmp_path / "start", seed=1)
    saved_adapter(tiny_model_dir, tmp_path / "trained", seed=2)
    x = torch.randint(0, start.config.vocab_size, (1, 12))
    model_config = ModelConfig(path=str(tiny_model_dir), dtype="float32")
    loaded = load_policy(tmp_path / "trained", model_config, CPU, reference_adapter=str(tmp_path / "start"))
    plain = load_policy(tmp_path / "trained", model_config, CPU)
    with torch.no_grad():
        expected = start(input_ids=x).logits
        with reference_mode(loaded):
            reference = loaded(input_ids=x).logits
        with reference_mode(plain):
            bare_base = plain(input_ids=x).logits
        policy = loaded(input_ids=x).logits
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(bare_base, expected), "without it the reference would be the bare base"
    torch.testing.assert_close(policy, plain(input_ids=x).logits)  # the policy is the trained adapter either way
