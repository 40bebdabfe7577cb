"""Token texts and bytes for log-probs, from the tokenizer's vocabulary: byte-level BPE and
SentencePiece's byte fallback; and the legacy completions' shape."""

from __future__ import annotations

import pytest

from dpo_lora.model.decode import Scored
from dpo_lora.serve.logprobs_wire import LegacyLogprobs, TokenTexts, chat_logprobs

from ..conftest import build_tiny_tokenizer

TEXT = "héllo wörld, 日本 ok"


def test_byte_level_tokens_bytes_spell_the_text_even_where_a_token_holds_part_of_a_character():
    tokenizer = build_tiny_tokenizer()
    texts = TokenTexts(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert texts.byte_level and b"".join(texts.bytes_of(t) for t in ids) == TEXT.encode()
    assert any("\ufffd" in texts.text_of(t) for t in ids), "日 and 本 are split into byte tokens"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert texts.bytes_of(end) == b"<|im_end|>" and texts.text_of(end) == "<|im_end|>"


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Llama-2-style tokenizer: BPE with byte fallback, spaces as U+2581."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in ("▁", "h", "i", "o", "k", "▁h", "▁hi", "▁o", "▁ok"):
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "i"), ("▁", "o"), ("▁o", "k")]
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model)


def test_sentencepiece_byte_fallback_and_spaces_give_the_texts_bytes(sentencepiece_like):
    texts = TokenTexts(sentencepiece_like)
    ids = sentencepiece_like("hi 日 ok", add_special_tokens=False)["input_ids"]
    pieces = sentencepiece_like.convert_ids_to_tokens(ids)
    assert "▁hi" in pieces and "<0xE6>" in pieces, pieces
    assert not texts.byte_level and b"".join(texts.bytes_of(t) for t in ids) == " hi 日 ok".encode()
    assert texts.text_of(ids[pieces.index("▁hi")]) == " hi"


def test_legacy_logprobs_hold_the_chosen_token_offsets_run_on_and_an_unscored_token_has_none():
    tokenizer = build_tiny_tokenizer()
    texts = TokenTexts(tokenizer)
    the, plot, was = tokenizer("The plot was", add_special_tokens=False)["input_ids"][:3]  # 'The', 'Ġp', 'l'
    legacy = LegacyLogprobs(texts, offset=5)
    first = legacy([None, Scored(plot, -2.0, ((was, -0.5), (the, -1.0)))], tokens=[the, plot])
    assert first["tokens"] == ["The", " p"] and first["text_offset"] == [5, 8]
    assert first["token_logprobs"] == [None, -2.0] and first["top_logprobs"][0] is None
    assert first["top_logprobs"][1] == {"l": -0.5, "The": -1.0, " p": -2.0}, "the k likeliest and the chosen one"
    assert legacy([Scored(was, -0.5, ((was, -0.5),))])["text_offset"] == [10], "offsets go on from the last call"
    chat = chat_logprobs(texts, [Scored(plot, -2.0, ((was, -0.5),))])
    assert chat == {"content": [{"token": " p", "logprob": -2.0, "bytes": [32, 112],
                                 "top_logprobs": [{"token": "l", "logprob": -0.5, "bytes": [108]}]}], "refusal": None}  # fmt: skip
