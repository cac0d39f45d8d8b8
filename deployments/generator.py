"""Generation from image embeddings + prompt with OPT (decoder-only) or Flan-T5 (encoder-decoder); no Ray.

Shared by the Ray Serve LLM stage (deployments/llm.py) and Triton's Python backend (exporters/triton_models).

The input layout is the one `Blip2Processor` + `Blip2ForConditionalGeneration.generate` build, so results are
token-identical to them: `[<image>] * num_query_tokens + prompt ids`, the image positions filled with the
image embeddings, OPT padded between the image tokens and the prompt (left padding of the text), T5 padded at
the end (right padding).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from blip2_serve.clients.contract import MAX_PROMPT_TOKENS
from blip2_serve.deployments import faults
from blip2_serve.deployments.batching import run_isolated
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.guided import Grammars
from blip2_serve.deployments.loading import load_language_model, load_processor, tune_once
from blip2_serve.deployments.text import final_text
from blip2_serve.deployments.types import GenerateRequest, GenerateResult, TokenLogprob
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request ready to join a batch."""

    request: GenerateRequest
    text_ids: tuple[int, ...]  # the tokenized prompt, special tokens included (no image tokens)
    embeds: torch.Tensor  # [num_query_tokens, llm_hidden]


class PromptEncoder:
    """Tokenizes and checks prompts for one checkpoint; needs its tokenizer and config, not its weights.

    Used wherever a request is checked before it joins a batch (the LLM stage, Triton's `blip2` model).
    """

    def __init__(self, tokenizer, blip2_config, max_prompt_tokens: int = MAX_PROMPT_TOKENS):
        self.tokenizer = tokenizer
        self.decoder_only = bool(blip2_config.use_decoder_only_language_model)
        self.image_token_id = blip2_config.image_token_index
        self.num_query_tokens = blip2_config.num_query_tokens
        # OPT has learned positions: prompt + answer must fit; T5's relative positions have no hard bound.
        text = blip2_config.text_config
        self.max_positions = getattr(text, "max_position_embeddings", None) if self.decoder_only else None
        self.max_prompt_tokens = max_prompt_tokens

    def encode(self, request: GenerateRequest, streaming: bool = False) -> tuple[int, ...]:
        """The prompt's token ids (special tokens included); raises InvalidInput for one the model cannot take."""
        if streaming and request.params.num_beams > 1:
            raise InvalidInput("streaming generates one token at a time: num_beams must be 1")
        if request.logprobs is not None and request.params.num_beams > 1:
            raise InvalidInput("log-probabilities are given for num_beams 1 only")
        if request.grammar is not None and request.params.num_beams > 1:
            raise InvalidInput("a response format (guided decoding) needs num_beams 1")
        # A token is rarely over 32 characters: a longer prompt is refused before it costs a tokenizer pass.
        if len(request.prompt) > 32 * self.max_prompt_tokens:
            raise InvalidInput(
                f"PROMPT is {len(request.prompt)} characters, over the limit of {self.max_prompt_tokens} tokens"
            )
        text_ids = tuple(self.tokenizer(request.prompt)["input_ids"])
        if self.image_token_id in text_ids:
            raise InvalidInput("PROMPT must not contain the image placeholder token '<image>'")
        if len(text_ids) > self.max_prompt_tokens:
            raise InvalidInput(f"PROMPT is {len(text_ids)} tokens, over the limit of {self.max_prompt_tokens}")
        total = self.num_query_tokens + len(text_ids) + request.params.max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise InvalidInput(
                f"PROMPT ({len(text_ids)} tokens) + {self.num_query_tokens} image tokens + max_new_tokens "
                f"({request.params.max_new_tokens}) = {total}, over this model's {self.max_positions} positions"
            )
        return text_ids


class LanguageGenerator:
    """The language half of a checkpoint with its tokenizer; no Ray, so other backends can reuse it."""

    def __init__(self, config: ModelConfig, max_prompt_tokens: int = MAX_PROMPT_TOKENS):
        self.config = config
        self.tokenizer = load_processor(config).tokenizer
        self.model, self.device, self.dtype = load_language_model(config)
        blip2 = self.model.config
        self.prompts = PromptEncoder(self.tokenizer, blip2, max_prompt_tokens)
        self.decoder_only = self.prompts.decoder_only
        self.image_token_id = blip2.image_token_index
        self.num_query_tokens = blip2.num_query_tokens
        self.llm_hidden = blip2.text_config.hidden_size
        self.pad_id = self.tokenizer.pad_token_id
        eos = self.model.language_model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        width = max(len(self.tokenizer), self.model.language_model.config.vocab_size)
        self.grammars = Grammars(self.tokenizer, eos if isinstance(eos, int) else min(self.eos_ids), width)
        self.split_batches = 0  # generate batches that failed and were run one request at a time

    def _split(self) -> None:
        self.split_batches += 1

    def prepare(self, request: GenerateRequest, embeds: torch.Tensor, streaming: bool = False) -> PreparedRequest:
        """Tokenize and check one request; raises InvalidInput for a prompt the model cannot take."""
        if tuple(embeds.shape) != (self.num_query_tokens, self.llm_hidden):
            raise InvalidInput(
                f"image embeddings of shape {tuple(embeds.shape)}; this model takes "
                f"[{self.num_query_tokens}, {self.llm_hidden}]"
            )
        prepared = PreparedRequest(request, self.prompts.encode(request, streaming), embeds)
        if request.grammar is not None:
            self.grammars.check(request.grammar)  # compiled once per format; one it cannot produce fails here
        return prepared

    def tune_once(self) -> None:
        """Time this machine's GEMMs for the packed layers, the first time (loading.tune_once); on the model's thread,
        in its turn at the cores."""
        tune_once(self.model)

    def run(self, batch: list[PreparedRequest]) -> list[GenerateResult | BaseException]:
        """Generate for a batch: requests that may share a generate call do; results in input order."""
        self.tune_once()
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(batch):
            params = item.request.params
            groups.setdefault((params.batch_key(), index if params.runs_alone else -1), []).append(index)
        results: list[GenerateResult | BaseException] = [None] * len(batch)  # type: ignore[list-item]
        for indices in groups.values():
            for index, result in zip(indices, run_isolated(self.generate, [batch[i] for i in indices], self._split)):
                results[index] = result
        return results

    def collate(self, batch: list[PreparedRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids, attention_mask [B, L]` laid out as Blip2Processor lays them out."""
        width = max(len(item.text_ids) for item in batch)
        image_ids = [self.image_token_id] * self.num_query_tokens
        rows, masks = [], []
        for item in batch:
            text, pad = list(item.text_ids), [self.pad_id] * (width - len(item.text_ids))
            if self.decoder_only:  # left padding of the text, after the image tokens
                rows.append(image_ids + pad + text)
                masks.append([1] * len(image_ids) + [0] * len(pad) + [1] * len(text))
            else:
                rows.append(image_ids + text + pad)
                masks.append([1] * (len(image_ids) + len(text)) + [0] * len(pad))
        return torch.tensor(rows, device=self.device), torch.tensor(masks, device=self.device)

    def embed_inputs(self, input_ids: torch.Tensor, batch: list[PreparedRequest]) -> torch.Tensor:
        """`inputs_embeds [B, L, llm_hidden]`: token embeddings with the image positions replaced by the image
        embeddings, as Blip2ForConditionalGeneration.generate builds them."""
        inputs_embeds = self.model.language_model.get_input_embeddings()(input_ids)
        image_positions = (input_ids == self.image_token_id).unsqueeze(-1)
        image_embeds = torch.stack([item.embeds for item in batch]).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_positions, image_embeds)

    @torch.inference_mode()
    def generate(self, batch: list[PreparedRequest], **extra) -> list[GenerateResult]:
        """One generate call for requests with equal batch keys; `extra` goes to `generate` (streamer, ...)."""
        params = batch[0].request.params
        faults.check(item.request.prompt for item in batch)
        input_ids, attention_mask = self.collate(batch)  # [B, L]
        language_model = self.model.language_model
        inputs = {"inputs_embeds": self.embed_inputs(input_ids, batch), "attention_mask": attention_mask}
        if self.decoder_only:
            inputs["input_ids"] = input_ids
        if params.runs_alone:
            torch.manual_seed(params.seed)
        max_new_tokens = max(item.request.params.max_new_tokens for item in batch)
        kwargs = params.generate_kwargs(max_new_tokens)
        if params.stop:
            kwargs["tokenizer"] = self.tokenizer
        wanted = [item.request.logprobs for item in batch]
        if any(k is not None for k in wanted):  # the raw logits of every step (the model's own distribution)
            extra = {**extra, "return_dict_in_generate": True, "output_logits": True}
        output = language_model.generate(**inputs, **kwargs, **extra)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        # OPT returns prompt + new tokens; T5 returns the decoder start token + new tokens.
        new_tokens = sequences[:, input_ids.shape[1] :] if self.decoder_only else sequences[:, 1:]
        results = []
        for row, (item, tokens) in enumerate(zip(batch, new_tokens)):
            logprobs = None
            if wanted[row] is not None:
                steps = [logits[row].float().log_softmax(-1) for logits in output.logits]
                logprobs = [step_logprobs(logp, int(t), wanted[row]) for logp, t in zip(steps, tokens)]
            results.append(self.result(item, tokens.tolist(), logprobs))
        return results

    def result(self, item: PreparedRequest, tokens: list[int], logprobs: list | None = None) -> GenerateResult:
        """The result of generated `tokens`: cut after the first end-of-sequence, text cut before a stop string.
        `logprobs`: (token, log-probability, alternatives) per token, where the request asked for them."""
        tokens = tokens[: item.request.params.max_new_tokens]
        finish_reason = "length"
        for position, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens, finish_reason = tokens[: position + 1], "stop"
                break
        decoder = self.text_decoder(item.request)
        text, stopped = final_text(decoder, tokens, item.request.params.stop)
        if item.request.grammar is not None:
            tokens = [self.grammars.model_token(token) for token in tokens]
        scored = None
        if item.request.logprobs is not None:
            scored = tuple(self._token_logprob(decoder, *entry) for entry in (logprobs or [])[: len(tokens)])
        return GenerateResult(
            item.request.request_id,
            text,
            tuple(tokens),
            self.prompt_tokens(item),
            "stop" if stopped else finish_reason,
            scored,
        )

    def text_decoder(self, request: GenerateRequest):
        """What turns the request's tokens into text: the tokenizer, or for guided decoding the guide's own view of
        each token (which knows the characters the vocabulary cannot write)."""
        return self.grammars if request.grammar is not None else self.tokenizer

    def _token_logprob(self, decoder, token: int, logprob: float, top: tuple[tuple[int, float], ...]) -> TokenLogprob:
        def text(token_id: int) -> str:
            return decoder.decode([token_id])

        return TokenLogprob(
            self.grammars.model_token(token), text(token), logprob, tuple((t, text(t), p) for t, p in top)
        )

    def prompt_tokens(self, item: PreparedRequest) -> int:
        """What the language model reads: the image tokens and the prompt's tokens."""
        return self.num_query_tokens + len(item.text_ids)

    def stream(self, item: PreparedRequest, on_tokens, cancelled: threading.Event) -> GenerateResult:
        """Generate for one request, calling `on_tokens(list[int])` as each token comes; ends early when
        `cancelled` is set. Runs on the model thread; streams greedy or sampled decoding (not beams)."""
        self.tune_once()
        streamer = _TokenStreamer(on_tokens)
        stopping = StoppingCriteriaList([_Cancelled(cancelled)])
        return self.generate([item], streamer=streamer, stopping_criteria=stopping)[0]


def step_logprobs(logp: torch.Tensor, token: int, top: int) -> tuple[int, float, tuple[tuple[int, float], ...]]:
    """`token`'s log-probability in `logp [vocab]` (the model's raw distribution, log-softmaxed: before any
    processor) and the `top` most likely tokens with theirs, most likely first."""
    best = logp.topk(top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return token, float(logp[token]), alternatives


class _TokenStreamer(BaseStreamer):
    """transformers streamer that forwards new token ids; the first `put` is the prompt (or decoder start)."""

    def __init__(self, on_tokens):
        self._on_tokens = on_tokens
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._on_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    """Stops generation once the consumer of a stream has gone away."""

    def __init__(self, event: threading.Event):
        self._event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)
