"""Request bodies parsed as JSON with bounds, for every route that takes JSON (KServe v2 infer and generate, the
binary extension's header, OpenAI embeddings; OpenAI chat goes through pydantic's parser, which has its own).

`json.loads` alone turns some valid but pathological bodies into crashes (500s): nesting deeper than the
interpreter's recursion limit (RecursionError), integers of more than 4300 digits (ValueError), and nesting that
parses but then overflows any recursive walk of the value. Here every such body is an InvalidInput (400) naming the
bound; sizes are already bounded by `server.max_request_bytes` (413) before parsing.
"""

from __future__ import annotations

import json
from typing import Any

from blip2_serve.deployments.errors import InvalidInput

MAX_DEPTH = 32  # the deepest a v2 request goes is 5 (body, inputs, tensor, data, row); generous for parameters
MAX_NUMBER_CHARS = 64  # any real dimension, count or parameter fits; 10**4300 does not
MAX_ITEMS = 4_000_000  # values in one body (a 64 MiB array of single digits would be 32 M tiny objects)


def _number(text: str) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(f"a number of {len(text)} characters; at most {MAX_NUMBER_CHARS}")
    return float(text) if any(c in text for c in ".eE") else int(text)


def _constant(name: str) -> float:
    raise InvalidInput(f"{name} is not a JSON number")


def _check_shape(value: Any, what: str) -> None:
    """Depth and item count of a parsed value, walked without recursion."""
    stack, items = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > MAX_ITEMS:
            raise InvalidInput(f"{what} holds more than {MAX_ITEMS} values")
        if isinstance(node, (list, dict)):
            if depth > MAX_DEPTH:
                raise InvalidInput(f"{what} nests deeper than {MAX_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def loads(data: bytes | str, what: str) -> Any:
    """The JSON value in `data`, or InvalidInput (400) saying why not."""
    try:
        value = json.loads(data, parse_int=_number, parse_float=_number, parse_constant=_constant)
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    except RecursionError:
        raise InvalidInput(f"{what} nests deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    _check_shape(value, what)
    return value


def loads_object(data: bytes | str, what: str) -> dict[str, Any]:
    """`loads`, and the value must be a JSON object."""
    value = loads(data, what)
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value
