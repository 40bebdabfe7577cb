"""An answer's tokens handed on as text: whole characters only, cut before the first stop string."""

from __future__ import annotations

from dpo_lora.serve.text_stream import PARTIAL, TextStream


def pieces(tokenizer, text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    out = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        out.append(stream.push(token))
        if stream.stopped:
            break
    out.append(stream.finish())
    return out, stream


def test_pieces_join_to_the_decoded_text_and_never_split_a_character(tiny_tokenizer):
    text = "Un film très émouvant 🎬 — superbe!"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(PARTIAL in tiny_tokenizer.decode([t]) for t in ids), "byte-level: some token is part of a character"
    out, _ = pieces(tiny_tokenizer, text, [])
    assert "".join(out) == text
    assert not any(PARTIAL in piece for piece in out)


def test_a_stop_string_across_tokens_ends_the_text_before_it(tiny_tokenizer):
    out, stream = pieces(tiny_tokenizer, "The plot was dull. Then it improved.", ["dull."])
    assert "".join(out) == "The plot was " and stream.stopped
    # The earliest of several stops wins; the text after a stop is never handed on.
    out, _ = pieces(tiny_tokenizer, "one two three four", ["four", "two"])
    assert "".join(out) == "one "


def test_a_tail_that_might_start_a_stop_is_held_back_until_it_does_not(tiny_tokenizer):
    stream = TextStream(tiny_tokenizer, ["plot twist"])
    handed = ""
    for token in tiny_tokenizer("The plot was", add_special_tokens=False)["input_ids"]:
        handed += stream.push(token)
        assert not handed.endswith("plot") and not handed.endswith("plot "), "'plot' may begin the stop"
    handed += stream.finish()
    assert handed == "The plot was" and not stream.stopped
