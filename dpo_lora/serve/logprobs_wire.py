"""Log-probs as OpenAI's API shows them, from the engine's `decode.Scored` tokens.

- Chat completions: `choice.logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}, ...]}, ...], "refusal": None}`, the k most likely first.
- Legacy completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
  "text_offset"}`. Each top dict holds the k most likely tokens and always the chosen one (so up
  to k + 1, as OpenAI documents). With `echo` the prompt's tokens come first, the first of them
  with None for both (nothing predicts it). `text_offset` counts characters from the start of the
  prompt, whether or not it is echoed.

A token's text is its bytes decoded (U+FFFD for a piece of a character). The bytes come from the
tokenizer's vocabulary, not from decoding the token alone: byte-level BPE (GPT-2, Llama 3, Qwen,
SmolLM2) writes each byte as one printable character, SentencePiece writes a byte-fallback token
as `<0xNN>` and a space as U+2581.
"""

from __future__ import annotations

import functools
import re

from dpo_lora.model.decode import Scored

SENTENCEPIECE_SPACE = "\u2581"
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: the printable Latin-1 bytes stand for
    themselves, and the other 68 bytes, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


class TokenTexts:
    """The bytes and text of a tokenizer's tokens, computed once per token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special = set(getattr(tokenizer, "all_special_ids", []))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one TokenTexts per engine, which lives as long)
    def bytes_of(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        alphabet = _byte_level_alphabet()
        if self.byte_level and token not in self.special and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        if match := BYTE_TOKEN.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace(SENTENCEPIECE_SPACE, " ").encode()

    def text_of(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", errors="replace")


def chat_logprobs(texts: TokenTexts, scored: list[Scored]) -> dict:
    """`choice.logprobs` (or a chunk's) of chat completions for these tokens."""

    def entry(token: int, logprob: float) -> dict:
        return {"token": texts.text_of(token), "logprob": logprob, "bytes": list(texts.bytes_of(token))}

    content = [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scored]
    return {"content": content, "refusal": None}


class LegacyLogprobs:
    """`choice.logprobs` of legacy completions, built chunk by chunk: each call covers the tokens
    given and moves the text offset past them."""

    def __init__(self, texts: TokenTexts, offset: int) -> None:
        self.texts, self.offset = texts, offset

    def __call__(self, scored: list[Scored | None], tokens: list[int] | None = None) -> dict:
        """`scored` per token; None for an unscored one, whose id `tokens` then gives (the prompt's first)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, s in enumerate(scored):
            text = self.texts.text_of(s.token if s else tokens[k])
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if s is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(s.logprob)
            top: dict[str, float] = {}
            for token, logprob in (*s.top, (s.token, s.logprob)):
                top.setdefault(self.texts.text_of(token), logprob)  # two ids with one text: the likelier
            out["top_logprobs"].append(top)
        return out
