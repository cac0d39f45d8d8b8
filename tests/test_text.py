"""Streamed text joins to exactly the finished text, whatever the stop strings and token boundaries."""

from __future__ import annotations

import pytest
from blip2_serve.deployments.text import TextAssembler, final_text


class CharTokenizer:
    """One character per token id; id 0 is a special token (dropped, like skip_special_tokens)."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens if t != 0)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize(
    "raw,stop,expected,stopped",
    [
        ("  a cat sits  ", (), "a cat sits", False),
        ("a cat. Question: more", ("Question:",), "a cat.", True),
        ("a cat Q", ("Question:",), "a cat Q", False),
        ("red and blue", ("and", "blue"), "red", True),
        ("ab\ufffd", (), "ab\ufffd", False),
        ("x ta black y", ("black",), "x ta", True),  # the space before a stop string is never shown
    ],
)
def test_streamed_chunks_join_to_the_final_text(raw, stop, expected, stopped):
    tokenizer = CharTokenizer()
    assert final_text(tokenizer, ids(raw) + [0], stop) == (expected, stopped)
    for step in (1, 2, 3):
        assembler = TextAssembler(tokenizer, stop)
        tokens = ids(raw)
        pieces = [assembler.update(tokens[i : i + step]) for i in range(0, len(tokens), step)]
        pieces.append(assembler.finish())
        assert "".join(pieces) == expected, (step, pieces)
