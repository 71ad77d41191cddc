"""The output processor: one reply's tokens in, its text out — detokenised, cut at stop strings, held back
where a stop string or half a character may begin.

Every request owns one `ReplyText`. The scheduler feeds it each accepted token (`put`) and, when the reply
ends, asks for what was held back (`flush`); a failure here (a tokenizer error) ends that one reply. No
model, no scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """Token ids in, text increments out, exactly as transformers' streamer prints them: per token, special
    tokens skipped, half a multi-byte character held back until the rest arrives."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._tokens: list[int] = []
        self._printed = 0

    def put(self, token: int) -> str:
        self._tokens.append(token)
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # half of a multi-byte character: wait for the rest
        printable, self._printed = text[self._printed:], len(text)
        if text.endswith("\n"):
            self._tokens, self._printed = [], 0  # keep re-decoding bounded
        return printable

    def flush(self) -> str:
        """Whatever is held back, once the reply has ended."""
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=True) if self._tokens else ""
        rest = text[self._printed:]
        self._tokens, self._printed = [], 0
        return rest


class StopText:
    """Cuts a streamed reply at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.text = ""  # everything emitted so far
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The part of `piece` that is certainly reply text (empty once stopped)."""
        if self.stopped:
            return ""
        if not self.stops:
            return self._emit(piece)
        buffer = self._pending + piece
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._pending = True, ""
            return self._emit(buffer[:cut])
        hold = max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if buffer.endswith(s[:k])), default=0)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return self._emit(buffer[: len(buffer) - hold])

    def flush(self) -> str:
        """What was held back, once the reply ended without a stop string."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else self._emit(rest)

    def _emit(self, text: str) -> str:
        self.text += text
        return text


class ReplyText:
    """One reply's text: `put` each token, `flush` at the end; `stopped` once a stop string was met.

    The reply is shown as a reply: without the space the chat template leaves after "Assistant:" (every
    reply's first token starts with it) — the template strips it too when the turn comes back as history.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self._text = TextStream(tokenizer)
        self._stop = StopText(stops)
        self._started = False

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def put(self, token: int) -> str:
        return self._stop.feed(self._strip(self._text.put(token)))

    def flush(self) -> str:
        return self._stop.feed(self._strip(self._text.flush())) + self._stop.flush()

    def _strip(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            self._started = bool(piece)
        return piece
