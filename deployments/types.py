"""The internal request and result types that travel between the edge and the deployments.

Every protocol (KServe v2 HTTP/gRPC, OpenAI chat, Triton's Python backend) converts to and from these
in one place each; the deployments know nothing else.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Mapping

from blip2_serve.clients.contract import (
    GENERATION_PARAMETERS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_NUM_BEAMS,
    MAX_STOP,
    PARAMETERS_BY_NAME,
    ParamSpec,
)
from blip2_serve.deployments.errors import InvalidInput

if TYPE_CHECKING:  # torch stays out of the edge's import path
    import torch


_DEFAULT = {spec.name: spec.default for spec in GENERATION_PARAMETERS}  # the contract's defaults


INTERACTIVE, BACKGROUND = 0, 1  # priority classes of the stages' queues (GenerateRequest.priority)


@dataclass(frozen=True)
class GenerationParams:
    """Per-request decoding settings, validated against the contract's ranges."""

    max_new_tokens: int = _DEFAULT["max_new_tokens"]
    min_new_tokens: int = _DEFAULT["min_new_tokens"]
    num_beams: int = _DEFAULT["num_beams"]
    do_sample: bool = _DEFAULT["do_sample"]
    temperature: float = _DEFAULT["temperature"]
    top_p: float = _DEFAULT["top_p"]
    top_k: int = _DEFAULT["top_k"]
    repetition_penalty: float = _DEFAULT["repetition_penalty"]
    seed: int | None = _DEFAULT["seed"]
    stop: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: GenerationParams | None = None) -> GenerationParams:
        """Validate `values` (names from clients.contract) over `base`; raises InvalidInput on any bad value."""
        base = base or cls()
        updates = {}
        for name, raw in values.items():
            spec = PARAMETERS_BY_NAME.get(name)
            if spec is None:
                known = ", ".join(p.name for p in GENERATION_PARAMETERS)
                raise InvalidInput(f"unknown generation parameter {name!r}; known: {known}")
            updates[name] = _coerce(spec, raw)
        params = replace(base, **updates)
        if params.min_new_tokens > params.max_new_tokens:
            raise InvalidInput(
                f"min_new_tokens ({params.min_new_tokens}) must not exceed max_new_tokens ({params.max_new_tokens})"
            )
        return params

    def batch_key(self) -> tuple:
        """Requests with equal keys may share one generate call without changing their results.

        Greedy and unseeded sampling ignore max_new_tokens (each row is cut to its own length); beam search
        keeps it (it changes which beams finish); a seeded sampling request runs alone, so its seed decides.
        """
        key = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.num_beams == 1:
            key.pop("max_new_tokens")
        if not self.do_sample:
            for name in ("temperature", "top_p", "top_k", "seed"):
                key.pop(name)
        return tuple(sorted(key.items()))

    def as_parameters(self) -> dict[str, Any]:
        """The settings that differ from the defaults, as KServe request parameters (what from_mapping reads)."""
        default = GenerationParams()
        values = {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)
        }
        if "stop" in values:
            if len(self.stop) != 1:
                raise InvalidInput("a KServe request carries one stop string")
            values["stop"] = self.stop[0]
        return values

    @property
    def runs_alone(self) -> bool:
        """A seeded sampling request owns the random generator for its whole generate call."""
        return self.do_sample and self.seed is not None

    def generate_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        """Keyword arguments for transformers `generate`; sampling knobs only when sampling."""
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": self.num_beams}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        kwargs["do_sample"] = self.do_sample
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.stop:
            kwargs["stop_strings"] = list(self.stop)  # generate also needs tokenizer= for these
        return kwargs


def _coerce(spec: ParamSpec, raw: Any) -> int | float | bool | tuple[str, ...] | None:
    """`raw` as `spec.kind`, within range; JSON numbers and numeric strings (gRPC string params) accepted."""
    if spec.kind is str:
        return _stop_strings(spec, raw)
    if spec.kind is bool:
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if not isinstance(raw, bool):
            raise InvalidInput(f"parameter {spec.name!r} must be a boolean, not {raw!r}")
        return raw
    if raw is None and spec.default is None:
        return None
    number = raw
    if isinstance(raw, str):
        try:
            number = float(raw)
        except ValueError:
            raise InvalidInput(f"parameter {spec.name!r} must be a number, not {raw!r}") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise InvalidInput(f"parameter {spec.name!r} must be a finite number, not {raw!r}")
    if spec.kind is int and not float(number).is_integer():
        raise InvalidInput(f"parameter {spec.name!r} must be an integer, not {raw!r}")
    value = spec.kind(number)
    low_ok = spec.minimum is None or (value > spec.minimum if spec.exclusive_min else value >= spec.minimum)
    high_ok = spec.maximum is None or value <= spec.maximum
    if not (low_ok and high_ok):
        low = "(" if spec.exclusive_min else "["
        raise InvalidInput(f"parameter {spec.name!r}={raw!r} is out of range {low}{spec.minimum}, {spec.maximum}]")
    return value


def _stop_strings(spec: ParamSpec, raw: Any) -> tuple[str, ...]:
    """A string or a list of up to MAX_STOP strings, each of `minimum`..`maximum` characters."""
    if raw is None:
        return ()
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise InvalidInput(f"parameter {spec.name!r} must be a string or a list of strings, not {raw!r}")
    if len(values) > MAX_STOP:
        raise InvalidInput(f"parameter {spec.name!r} takes at most {MAX_STOP} strings, not {len(values)}")
    for value in values:
        if not spec.minimum <= len(value) <= spec.maximum:
            raise InvalidInput(
                f"parameter {spec.name!r}: each string must be {spec.minimum}..{spec.maximum} characters"
            )
    return tuple(values)


@dataclass(frozen=True)
class GenerationLimits:
    """What one server lets a request ask for (server config), checked before any model work."""

    max_new_tokens: int = MAX_NEW_TOKENS_LIMIT
    max_num_beams: int = MAX_NUM_BEAMS

    def check(self, params: GenerationParams) -> None:
        if params.max_new_tokens > self.max_new_tokens:
            raise InvalidInput(
                f"max_new_tokens {params.max_new_tokens} is over this server's limit of {self.max_new_tokens}"
            )
        if params.num_beams > self.max_num_beams:
            raise InvalidInput(f"num_beams {params.num_beams} is over this server's limit of {self.max_num_beams}")


@dataclass(frozen=True)
class EncodedImage:
    """An image file as the client sent it; `digest` (sha256 hex) keys caches. Checked, not decoded."""

    data: bytes
    digest: str
    width: int
    height: int
    format: str

    @classmethod
    def of(cls, data: bytes, width: int, height: int, format: str) -> EncodedImage:
        return cls(data, hashlib.sha256(data).hexdigest(), width, height, format)


@dataclass(frozen=True)
class GenerateRequest:
    """One image and one prompt to generate from. `prompt` "" means plain captioning. `priority`: INTERACTIVE (a
    client waits) or BACKGROUND (a Batch API line), which the stages' queues serve only when no interactive work
    waits."""

    request_id: str
    image: EncodedImage | None
    prompt: str = ""
    params: GenerationParams = GenerationParams()
    priority: int = 0  # INTERACTIVE
    # None: no log-probabilities; k >= 0: each generated token's log-probability under the model and the k most
    # likely tokens at its step (OpenAI's logprobs / top_logprobs), in GenerateResult.logprobs
    logprobs: int | None = None
    # a regular expression the generated text must match (outlines-core's syntax: OpenAI's response_format JSON
    # object or schema, deployments/guided.py), enforced token by token; None: free text
    grammar: str | None = None

    def without_image(self) -> GenerateRequest:
        """The request as the LLM stage needs it: the image travels as ImageEmbeds instead."""
        return replace(self, image=None)


@dataclass(frozen=True)
class ImageEmbeds:
    """The vision stage's output for one image: `embeds [num_query_tokens, llm_hidden]`, CPU, model dtype."""

    embeds: torch.Tensor
    digest: str


@dataclass(frozen=True)
class GenerateResult:
    """Generated tokens (without prompt, pads or decoder start) and their text (cut before a stop string)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int  # what the language model read: image tokens + prompt tokens
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens reached)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of token_ids, where the request asked

    @property
    def score(self) -> float | None:
        """The mean log-probability of the generated tokens (end-of-sequence included): what ranks captions of
        one image; None where the request asked for no log-probabilities."""
        if self.logprobs is None:
            return None
        return sum(t.logprob for t in self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its own distribution: before temperature, top-k/p and
    repetition penalty, as vLLM's default), with the `top` most likely tokens of its step, most likely first."""

    token_id: int
    text: str  # the token decoded alone
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, log-probability)


@dataclass(frozen=True)
class GenerateChunk:
    """One step of a streamed generation: new text and tokens; the last chunk has `finish_reason`."""

    request_id: str
    text: str  # the text added since the previous chunk
    token_ids: tuple[int, ...]  # the tokens added since the previous chunk
    prompt_tokens: int
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None
