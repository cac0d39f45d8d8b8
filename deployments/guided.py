"""Guided decoding: every generated token keeps the text a match of a regular expression (OpenAI's response_format
json_object / json_schema, turned into one by outlines-core), applied per sequence inside the engine's batch.

outlines-core compiles the expression against the model's vocabulary (each token as the bytes it decodes to) into
an index of allowed tokens per state; a sequence walks it with a Guide, one token at a time, and may end (its
end-of-sequence token is allowed) only where the text is a full match. Compiled indexes are kept per expression.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache

from blip2_serve.deployments.errors import InvalidInput

# The whitespace a generated JSON text may have between its tokens: one space at most, so that a model cannot spend
# its tokens on blank space (outlines' default allows any run of it).
WHITESPACE = r"[ ]?"
MAX_SCHEMA_BYTES = 64 * 1024
# JSON's structural characters. Where no token of the vocabulary writes one (Flan-T5's SentencePiece vocabulary has
# no "{" or "}": its tokenizer reads them as <unk>), the guide gets a token of its own for it, beyond the model's
# vocabulary, which the model is fed and scored as <unk>: what it reads for that character in a tokenized text.
STRUCTURE = '{}[]":,'


# JSON-schema keywords outlines-core's expressions do not enforce (checked: a text that breaks them still matches).
# A schema that uses one is refused, so that whatever is accepted is always met.
UNENFORCED = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


def unenforced(schema, at: str = "") -> list[str]:
    """Where `schema` uses a keyword of UNENFORCED: ["maximum at properties.count", ...] (property names are names,
    not keywords: only schema positions are looked at)."""
    if not isinstance(schema, dict):
        return []
    found = [f"'{key}' at {at or 'the top'}" for key in UNENFORCED if key in schema]
    for group in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(group) or {}).items() if isinstance(schema.get(group), dict) else ():
            found += unenforced(sub, f"{at}.{group}.{name}".lstrip("."))
    for group in _SUBSCHEMA_LISTS:
        for index, sub in enumerate(schema.get(group) or []) if isinstance(schema.get(group), list) else ():
            found += unenforced(sub, f"{at}.{group}[{index}]".lstrip("."))
    for key in _SUBSCHEMAS:
        found += unenforced(schema.get(key), f"{at}.{key}".lstrip("."))
    return found


def json_regex(response_format: dict) -> str | None:
    """The expression for OpenAI's `response_format`: None for text, any JSON object for json_object, the schema's
    for json_schema. InvalidInput for anything else or a schema outlines-core cannot compile."""
    from outlines_core.json_schema import build_regex_from_schema

    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidInput("'response_format.json_schema.schema' must be a JSON schema object")
    else:
        raise InvalidInput("'response_format.type' must be text, json_object or json_schema")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise InvalidInput(f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes")
    if found := unenforced(schema):
        raise InvalidInput(
            "this server cannot guide decoding by that JSON schema: it cannot enforce " + ", ".join(found[:5])
        )
    try:
        return build_regex_from_schema(text, whitespace_pattern=WHITESPACE)
    except Exception as exc:  # outlines-core raises ValueError / its own errors for what it cannot express
        raise InvalidInput(f"this server cannot guide decoding by that JSON schema: {exc}") from None


def token_bytes(tokenizer) -> dict[bytes, list[int]]:
    """Each ordinary token as the bytes it stands for: byte-level BPE (OPT's GPT-2 tokenizer) maps its characters
    back to bytes; SentencePiece (T5) writes spaces as U+2581 and odd bytes as <0xNN>. Special tokens are left out."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    byte_level = "ByteLevel" in kinds
    to_byte = {character: byte for byte, character in _byte_characters().items()}
    special = set(tokenizer.all_special_ids)
    fallback = re.compile(r"<0x([0-9A-Fa-f]{2})>")
    table: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if byte_level:
            if not all(character in to_byte for character in token):
                continue
            data = bytes(to_byte[character] for character in token)
        elif match := fallback.fullmatch(token):
            data = bytes([int(match.group(1), 16)])
        else:
            data = token.replace("\u2581", " ").encode("utf-8")
        if data:
            table.setdefault(data, []).append(token_id)
    return table


def _byte_characters() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes for the
    characters from U+0100 on, in byte order (so a space is "Ġ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {byte: chr(byte) for byte in printable}, 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class Grammars:
    """The compiled indexes of one tokenizer; `guide(expression)` starts a sequence's walk. Token ids from
    `first_free_id` on (at least the model's logits width) are the written characters' own tokens."""

    def __init__(self, tokenizer, eos_id: int, first_free_id: int):
        self._tokenizer, self._eos_id, self.first_free_id = tokenizer, eos_id, first_free_id
        self.unk_id = tokenizer.unk_token_id
        self._lock = threading.Lock()
        self._vocabulary = None
        self._bytes: dict[int, bytes] = {}
        self._index = lru_cache(maxsize=64)(self._compile)

    def _build(self) -> None:
        from outlines_core import Vocabulary

        with self._lock:
            if self._vocabulary is not None:
                return
            table = token_bytes(self._tokenizer)
            if self.unk_id is not None:
                missing = [c for c in STRUCTURE if c.encode() not in table]
                for offset, character in enumerate(missing):
                    table[character.encode()] = [self.first_free_id + offset]
            self._bytes = {token: data for data, tokens in table.items() for token in tokens}
            self._vocabulary = Vocabulary(self._eos_id, table)

    def model_token(self, token: int) -> int:
        """What the model reads (and clients see as the token id) for a generated token: <unk> for a written
        character."""
        return token if token < self.first_free_id else self.unk_id

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        """A guided sequence's text: the bytes each token stands for in the guide's view (special tokens write
        nothing), so that the text is the one the expression matched. TextAssembler's tokenizer for such requests."""
        self._build()
        return b"".join(self._bytes.get(token, b"") for token in tokens).decode("utf-8", errors="replace")

    def _compile(self, expression: str):
        from outlines_core import Index

        self._build()
        try:
            return Index(expression, self._vocabulary)
        except Exception as exc:  # a character no token writes: Flan-T5's SentencePiece vocabulary has no "{" or "}"
            missing = re.search(r"following characters: (\[.*?\])", str(exc))
            detail = f"no token of it writes {missing.group(1)}" if missing else str(exc)
            raise InvalidInput(f"this model's vocabulary cannot write that format: {detail}") from None

    def check(self, expression: str) -> None:
        """Compile (or find) the expression's index: a format the vocabulary cannot produce fails here, before the
        request joins a batch."""
        self._index(expression)

    def guide(self, expression: str):
        from outlines_core import Guide

        return Guide(self._index(expression))
