"""Generated tokens -> the text a client sees, all at once or growing chunk by chunk, with one set of rules.

Rules: special tokens dropped, surrounding whitespace stripped, text cut before the first stop string.
A streamed answer's chunks join to exactly the non-streamed text: a chunk never shows what a later token could
still change (an incomplete UTF-8 character, trailing whitespace, the start of a stop string).
"""

from __future__ import annotations


class TextAssembler:
    """Decodes a growing token list; `update` returns the new stable text, `finish` the rest."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._tokens: list[int] = []
        self._emitted = ""
        self.stopped = False  # a stop string was found: the caller may end generation

    def _visible(self) -> str:
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True).lstrip()
        cuts = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if cuts:
            self.stopped = True
            return text[: min(cuts)]
        return text

    def _held_back(self, text: str) -> int:
        """How many trailing characters a later token could still change."""
        end = len(text.rstrip().rstrip("\ufffd"))
        partial = 0  # the longest end of the text that begins a stop string
        for stop in self._stop:
            for size in range(min(len(stop) - 1, end), partial, -1):
                if text[end - size : end] == stop[:size]:
                    partial = size
                    break
        return len(text) - len(text[: end - partial].rstrip())

    def _take(self, text: str) -> str:
        if not text.startswith(self._emitted):  # decoding rewrote earlier text: show nothing more until finish
            return ""
        delta, self._emitted = text[len(self._emitted) :], text
        return delta

    def update(self, tokens: list[int]) -> str:
        """Add tokens; the text that is now final."""
        self._tokens.extend(tokens)
        text = self._visible()
        if self.stopped:
            return self._take(text.rstrip())
        return self._take(text[: len(text) - self._held_back(text)])

    def finish(self) -> str:
        """The remaining text once generation has ended."""
        return self._take(self._visible().rstrip())

    @property
    def text(self) -> str:
        """All text shown so far."""
        return self._emitted


def final_text(tokenizer, tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(text, a stop string ended it) for a finished generation."""
    assembler = TextAssembler(tokenizer, stop)
    assembler.update(tokens)
    assembler.finish()
    return assembler.text, assembler.stopped
