"""One answer's tokens as text, piece by piece, cut at its first stop string.

A byte-level tokenizer splits a character across tokens, and a stop string may span several, so a
token alone is not a piece of text. Each push decodes the whole answer so far and hands on what is
settled: not a trailing partial character (U+FFFD), not a tail that could still grow into a stop
string. The text never includes the stop string, as in OpenAI's API.
"""

from __future__ import annotations

PARTIAL = "\ufffd"  # what decoding shows for the first bytes of an unfinished character


class TextStream:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters handed on
        self.stopped = False  # a stop string was reached

    def push(self, token: int) -> str:
        """Add a token; the text that is now settled."""
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._hand_on(text, cut)
        return self._hand_on(text, len(text) - self._held(text))

    def finish(self) -> str:
        """The answer ended (EOS or length): whatever was held back, unless a stop string ended it."""
        return "" if self.stopped else self._hand_on(self._text(), len(self._text()))

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _held(self, text: str) -> int:
        """How many trailing characters to keep back: a partial character, or the longest tail that
        is the start of a stop string."""
        if text.endswith(PARTIAL):
            return len(text) - len(text.rstrip(PARTIAL))
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])), default=0)  # fmt: skip

    def _hand_on(self, text: str, end: int) -> str:
        piece = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece
