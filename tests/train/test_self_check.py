"""The startup self-check catches fast paths that are wrong for a model, and falls back to the plain path."""

from __future__ import annotations

import pytest
import torch

from dpo_lora.model import chunked_logps
from dpo_lora.train.loop import train

from .test_loop import tiny_config, train_rows

STEPS = ["train.max_steps=3", "train.micro_batch_size=2", "data.eval=null", "train.lr=1e-2"]
PLAIN = ["train.logps_chunk_size=0", "train.share_prompt=false", "train.self_check=false"]


def save(config, folder, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import GraniteConfig

    config = GraniteConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)  # fmt: skip
    return save(config, tmp_path_factory.mktemp("granite"), tiny_tokenizer)


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import BloomConfig

    config = BloomConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, n_layer=2, n_head=4)  # ALiBi positions
    return save(config, tmp_path_factory.mktemp("bloom"), tiny_tokenizer)


def logged(model_dir, out, *overrides) -> list[float]:
    """Per step: the loss and the policy's log-probs of the chosen completions."""
    train(tiny_config(model_dir, out, *STEPS, *overrides))
    return [value for row in train_rows(out) for value in (row["loss"], row["logps/chosen"])]


def test_the_static_check_keeps_scaled_heads_plain(granite_dir):
    from transformers import AutoModelForCausalLM, GraniteConfig

    assert not chunked_logps.install(AutoModelForCausalLM.from_pretrained(granite_dir), 64)  # logits_scaling
    config = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, logits_scaling=1.0)  # fmt: skip
    assert chunked_logps.install(AutoModelForCausalLM.from_config(config), 64), "unscaled heads still chunk"


def test_self_check_turns_off_a_wrong_chunked_head_then_trains_like_the_plain_path(
    granite_dir, tmp_path, monkeypatch, capsys
):
    # A head the static check does not know: chunking ignores Granite's logit scaling.
    monkeypatch.setattr(chunked_logps, "_head", lambda model: model.get_base_model().get_output_embeddings())
    checked = logged(granite_dir, tmp_path / "checked")
    assert "self-check: train.logps_chunk_size off for GraniteForCausalLM" in capsys.readouterr().err
    plain = logged(granite_dir, tmp_path / "plain", *PLAIN)
    unchecked = logged(granite_dir, tmp_path / "unchecked", "train.self_check=false")
    assert checked == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert unchecked != pytest.approx(plain, rel=1e-2), "without the check the run scores wrong log-probs"


def test_self_check_turns_off_prompt_sharing_for_alibi_then_trains_like_the_plain_path(bloom_dir, tmp_path, capsys):
    checked = logged(bloom_dir, tmp_path / "checked")
    assert "self-check: train.share_prompt off for BloomForCausalLM" in capsys.readouterr().err
    plain = logged(bloom_dir, tmp_path / "plain", *PLAIN)
    assert checked == pytest.approx(plain, rel=1e-4, abs=1e-5)


class HeadOnly(torch.nn.Module):
    """Just what the static check reads: a config and a plain linear LM head."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.head = config, torch.nn.Linear(8, 16, bias=False)

    def get_output_embeddings(self):
        return self.head


def test_the_static_check_reads_falcon_h1_multipliers_and_softcaps_under_text_config():
    from transformers import FalconH1Config, Gemma3Config

    assert chunked_logps._head(HeadOnly(FalconH1Config())) is not None  # multiplier 1: the plain head
    assert chunked_logps._head(HeadOnly(FalconH1Config(lm_head_multiplier=0.5))) is None
    assert chunked_logps._head(HeadOnly(Gemma3Config())) is not None
    softcapped = Gemma3Config(text_config={"final_logit_softcapping": 30.0})
    assert chunked_logps._head(HeadOnly(softcapped)) is None  # found under text_config
