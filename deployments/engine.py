"""Iteration-level (continuous) batching for the LLM stage: one decode step at a time for every running sequence.

A new request is prefilled on its own (OPT: image tokens + prompt through the decoder; T5: the encoder, then the
decoder's first step) and joins the running batch between steps; a finished one leaves at once. The running batch
keeps one KV cache per layer, `[batch, heads, length, head_dim]`, left-padded: a joining sequence (or the batch) is
padded on the left to the longer of the two, and padding is masked. OPT's positions come from the attention mask
and T5's relative position bias depends only on key - query distances, so left padding changes neither.

Greedy and sampled decoding run here (sampling with a per-request generator, so a seeded request gives the same text
whatever it is batched with); beam search runs between steps as an exclusive job (LanguageGenerator.run).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from blip2_serve.clients.contract import STAGE_BATCH_SIZE
from blip2_serve.deployments import faults
from blip2_serve.deployments.cores import BusySignal, CoreTurns, threads_here, turn_of
from blip2_serve.deployments.generator import LanguageGenerator, PreparedRequest, step_logprobs
from blip2_serve.deployments.head import GreedyHead, wanted_screen, without_banned
from blip2_serve.deployments.kvcache import SlabLayer, slab_wanted
from blip2_serve.deployments.text import TextAssembler
from blip2_serve.deployments.types import GenerateResult
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

logger = logging.getLogger(__name__)

DEFER_POLL_S = 0.01  # how often a deferring engine looks at the vision stage again


@dataclass(eq=False)
class Sequence:
    """One request in the engine: its decoding state and where its tokens and result go."""

    item: PreparedRequest
    on_done: Callable[[GenerateResult | BaseException], None]
    on_tokens: Callable[[list[int]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    history: list[int] = field(default_factory=list)  # what history-based processors read
    generated: list[int] = field(default_factory=list)
    rng: torch.Generator | None = None
    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    assembler: TextAssembler | None = None  # only when the request has stop strings
    # (token, log-probability, ((token, log-probability), ...)) per generated token, where the request asks
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] | None = None
    guide: object | None = None  # an outlines-core Guide where the request has a response format
    error: BaseException | None = None  # why it failed, where choosing its next token did
    submitted_at: float = field(default_factory=time.perf_counter)
    queued_s: float = 0.0  # from submit to the start of its prefill


def _pad(tensor: torch.Tensor, length: int, dim: int, left: bool = True) -> torch.Tensor:
    """Zeros added along `dim` (before the data when `left`) up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    zeros = tensor.new_zeros(shape)
    return torch.cat([zeros, tensor] if left else [tensor, zeros], dim=dim)


def _join_layers(running: DynamicCache, joining: DynamicCache, left: bool = True) -> None:
    """Append `joining`'s rows to `running`, padding the shorter along the sequence axis (dim 2)."""
    for mine, theirs in zip(running.layers, joining.layers):
        if isinstance(mine, SlabLayer):  # in place: the new rows written, the running ones left where they are
            mine.join(theirs.keys, theirs.values, left)
            continue
        length = max(mine.keys.shape[2], theirs.keys.shape[2])
        mine.keys = torch.cat([_pad(mine.keys, length, 2, left), _pad(theirs.keys, length, 2, left)])
        mine.values = torch.cat([_pad(mine.values, length, 2, left), _pad(theirs.values, length, 2, left)])


def _cache_argument(model) -> str:
    """The name this transformers version's forward takes the KV cache by: `cache` (from 5.2x, where the old
    `past_key_values` still works but warns on every call) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    """The KV cache a forward returned (`cache`, or `past_key_values` in older transformers)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _guided(scores: torch.Tensor, allowed: list[int], grammars) -> tuple[torch.Tensor, list[int]]:
    """`scores [1, vocab]` with every token the guide does not allow at -inf, and a column after the vocabulary for
    each allowed character the vocabulary cannot write (scored as <unk>); returns the scores and the token of each
    of those columns. Where the minimum length's ban leaves nothing allowed (a finished JSON text may only end), the
    allowed tokens get equal scores."""
    width = scores.shape[-1]
    real = torch.tensor([t for t in allowed if t < width], dtype=torch.long, device=scores.device)
    written = [t for t in allowed if t >= width]
    masked = torch.full((1, width + len(written)), -float("inf"), device=scores.device)
    masked[:, real] = scores[:, real]
    if written:
        masked[:, width:] = scores[:, grammars.unk_id]
    if torch.isinf(masked).all():
        masked[:, real] = 0.0
        masked[:, width:] = 0.0
    return masked, written


def _select_layers(cache: DynamicCache, rows: torch.Tensor, first_column: int = 0) -> None:
    for layer in cache.layers:
        if isinstance(layer, SlabLayer):
            layer.select(rows.tolist(), first_column)
            continue
        layer.keys = layer.keys[rows, :, first_column:]
        layer.values = layer.values[rows, :, first_column:]


class ContinuousBatcher:
    """Owns the language model on one thread; `submit` from any thread, results through callbacks."""

    def __init__(
        self,
        generator: LanguageGenerator,
        max_running: int = STAGE_BATCH_SIZE,
        gather_s: float = 0.0,
        turns: CoreTurns | None = None,
        upstream: BusySignal | None = None,
        defer_limit_s: float = 3.0,
        on_step: Callable[[int, float], None] | None = None,
    ):
        self.generator = generator
        self.turns = turns  # on a CPU node: each iteration (jobs, prefill, one step) waits for its turn at the cores
        # A decode step reads every weight whatever the batch, so one step over 16 sequences costs far less than 16
        # over one: while the vision stage (`upstream`) has images in hand and the batch has room, the engine leaves
        # the cores to it, so that those images' requests join this batch instead of stepping it half empty
        # (measured: 44 steps at 7.3 sequences for 16 concurrent captions, against 20 at 15.2). At most
        # `defer_limit_s` at a time, so that a busy vision stage never starves decoding.
        self.upstream = upstream
        self.defer_limit_s = defer_limit_s
        self._deferring_since: float | None = None
        self.deferred_s = 0.0
        self.max_running = max_running
        # When idle, wait this long after the first arrival so that requests sent together are prefilled together
        # (a busy engine admits between steps without waiting). 0 by default: measured, 3 ms here cost 3 ms of
        # latency at concurrency 1, and ask_many's prompts arrive in one call anyway (LLMDeployment.generate_many).
        self.gather_s = gather_s
        self.model = generator.model.language_model
        self._cache_argument = _cache_argument(self.model)
        # on CPU: greedy tokens from a bf16 screen of the output projection, checked (deployments/head.py); a model
        # that packs its layers had its head installed when it was loaded
        compiled = generator.config.compile_decode  # then the full projection: the screen's bookkeeping is Python
        kind = None if compiled else wanted_screen(generator.config.greedy_screen, self.model)
        self.head = GreedyHead.install(self.model, kind=kind) if kind is not None else None
        # the decode step's forward (ModelConfig.compile_decode); prefills stay eager (their shapes vary the most)
        self._decode = torch.compile(self.model, dynamic=True) if compiled else self.model
        self.slab = slab_wanted(generator.config.kv_cache)
        self._fast_logits = False  # whether the last forward's logits came from the head's fast GEMM
        # waiting sequences, interactive before background (GenerateRequest.priority), first come first served within
        self._incoming: queue.PriorityQueue[tuple[int, int, Sequence]] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._handover = threading.Lock()  # held while sequences are handed over and while the engine takes them
        self._exclusive: queue.Queue[tuple[Callable, tuple, Future]] = queue.Queue()
        self._wake = threading.Event()
        self._running: list[Sequence] = []
        self._admitting: list[Sequence] = []  # taken from the queue, not yet running (see _fail_in_hand)
        self.steps = 0  # decode steps taken (all running sequences advance one token per step)
        self.stepped = 0  # sequences advanced, summed over steps: stepped / steps is the mean decode batch
        self.busy_s = 0.0  # time spent in iterations (jobs, prefills, steps), turns excluded
        self.max_running_seen = 0
        self.split_prefills = 0  # prefills of several sequences that failed and were run one by one
        self.on_step = on_step  # (sequences, seconds) after every decode step, on the engine thread (metrics)
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- any thread
    def submit(self, sequence: Sequence) -> None:
        self.submit_many([sequence])

    def submit_many(self, sequences: list[Sequence]) -> None:
        """Hand sequences over at once: the engine admits them together (one prefill), never some now and the rest
        at the next step (measured, 5 Flan-T5 questions about one image: admitted as 2 + 3, 3.52 s; HF's batched
        generate 3.09 s; OPT's shared image prefix needs them in one admission too)."""
        with self._handover:
            for sequence in sequences:
                self._incoming.put((sequence.item.request.priority, next(self._arrivals), sequence))
        self._wake.set()

    def run_exclusive(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the engine thread between two steps (beam search uses generate on its own)."""
        future: Future = Future()
        self._exclusive.put((fn, args, future))
        self._wake.set()
        return future

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the engine thread
    def _loop(self) -> None:
        threads_here()  # this thread's OpenMP thread count, as the process's (deployments/cores.py)
        while True:
            if not self._running and self._incoming.empty() and self._exclusive.empty():
                self._wake.wait()
                self._wake.clear()
                time.sleep(self.gather_s)
            if self._defer():
                time.sleep(DEFER_POLL_S)
                continue
            with turn_of(self.turns):
                try:
                    self._timed_iteration()
                except Exception as exc:  # a defect the narrower handlers missed: fail what is in hand, go on
                    logger.exception("engine iteration failed")
                    self._fail_in_hand(exc)

    def _defer(self) -> bool:
        """Whether to leave the cores to the vision stage for now (see `upstream`)."""
        room = len(self._running) + self._incoming.qsize() < self.max_running and self._exclusive.empty()
        now = time.perf_counter()
        if self.upstream is None or not room or not self.upstream.is_busy():
            self._deferring_since = None
            return False
        if self._deferring_since is None:
            self._deferring_since = now
        if now - self._deferring_since >= self.defer_limit_s:
            self._deferring_since = None  # one iteration now, then defer again
            return False
        self.deferred_s += DEFER_POLL_S
        return True

    def _timed_iteration(self) -> None:
        started = time.perf_counter()
        try:
            self._iterate()
        finally:
            self.busy_s += time.perf_counter() - started

    def _iterate(self) -> None:
        """Exclusive jobs, then admit what waits, then one decode step for every running sequence."""
        self.generator.tune_once()  # at the first iteration, in the engine's turn at the cores (loading.tune_once)
        while not self._exclusive.empty():
            fn, args, future = self._exclusive.get()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller gets it; the engine goes on
                future.set_exception(exc)
        waiting = self._admitting = []
        with self._handover:
            while len(self._running) + len(waiting) < self.max_running and not self._incoming.empty():
                waiting.append(self._incoming.get()[2])
        if waiting:
            self._admit(waiting)
        self._admitting = []
        if self._running:
            try:
                self._step()
            except Exception as exc:  # a failed step fails the sequences in it, not the engine
                logger.exception("decode step failed")
                self._fail_in_hand(exc)

    def _fail_in_hand(self, exc: BaseException) -> None:
        """Fail every running sequence and every one being admitted with `exc`, and start the batch afresh: no
        accepted request is left waiting on an engine that lost track of it."""
        for sequence in {id(s): s for s in [*self._running, *self._admitting]}.values():
            try:
                sequence.on_done(exc)
            except Exception:  # already settled
                pass
        self._running, self._admitting = [], []
        self._reset_batch()

    def _reset_batch(self) -> None:
        self._cache = self._cross = self._mask = self._encoder_states = self._encoder_mask = None

    def _prepare(self, sequence: Sequence) -> None:
        """Logits processors, generator and stop-string watcher of a sequence about to start."""
        params = sequence.item.request.params
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.do_sample:
            processors += [TemperatureLogitsWarper(params.temperature)]
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            sequence.rng = torch.Generator(device=self.generator.device)
            sequence.rng.manual_seed(params.seed if params.seed is not None else torch.seed())
        sequence.processors = processors
        sequence.logprobs = [] if sequence.item.request.logprobs is not None else None
        grammar = sequence.item.request.grammar
        sequence.guide = self.generator.grammars.guide(grammar) if grammar is not None else None
        if params.stop:
            sequence.assembler = TextAssembler(self.generator.text_decoder(sequence.item.request), params.stop)
        if self.generator.decoder_only:  # what history-based processors see, as in generate: no padding
            sequence.history = [self.generator.image_token_id] * self.generator.num_query_tokens + list(
                sequence.item.text_ids
            )
        else:
            sequence.history = [self.model.config.decoder_start_token_id]

    @torch.inference_mode()
    def _admit(self, sequences: list[Sequence]) -> None:
        """Prefill the waiting sequences together (one forward pass), then join them to the running batch."""
        now = time.perf_counter()
        starting = []
        for sequence in sequences:
            sequence.queued_s = now - sequence.submitted_at
            if sequence.cancelled.is_set():
                sequence.on_done(self.generator.result(sequence.item, []))
            else:
                try:
                    self._prepare(sequence)
                except Exception as exc:  # its processors or guide cannot be set up: it alone fails
                    logger.exception("preparing %s failed", sequence.item.request.request_id)
                    sequence.on_done(exc)
                    continue
                starting.append(sequence)
        if starting:
            self._start(starting)

    def _start(self, starting: list[Sequence]) -> None:
        """Prefill `starting` together and join them to the running batch; where the prefill fails, each runs alone,
        so that only the culprit fails (as run_isolated does for a whole batch)."""
        try:
            logits, cache = self._prefill(starting)
        except Exception as exc:
            if len(starting) == 1:
                logger.exception("prefill failed")
                starting[0].on_done(exc)
                return
            logger.warning("prefill of %d sequences failed (%s); admitting them one by one", len(starting), exc)
            self.split_prefills += 1
            for sequence in starting:
                self._start([sequence])
            return
        first = not self._running
        self._running += starting
        if first:
            self._cache, self._mask = cache["cache"], cache["mask"]
            self._cross = cache.get("cross")
            if self.slab:  # the batch's caches from here on in preallocated buffers (deployments/kvcache.py)
                for layers in (self._cache.layers, self._cross.layers if self._cross is not None else []):
                    layers[:] = [SlabLayer(layer.keys, layer.values, self.max_running) for layer in layers]
            self._encoder_states, self._encoder_mask = cache.get("encoder_states"), cache.get("encoder_mask")
        else:
            self._join(cache)
        self._emit(starting, logits)

    def _prefill(self, sequences: list[Sequence]) -> tuple[torch.Tensor, dict]:
        """Logits `[len(sequences), vocab]` for each one's first new token, and their caches (padded as
        Blip2Processor pads a batch: OPT's text on the left of its prompt, T5's on the right)."""
        generator, items = self.generator, [s.item for s in sequences]
        faults.check(item.request.prompt for item in items)
        input_ids, attention_mask = generator.collate(items)  # [B, L]
        inputs_embeds = generator.embed_inputs(input_ids, items)  # [B, L, llm_hidden]
        if generator.decoder_only:
            prefix = self._shared_image_prefix(inputs_embeds, items)
            if prefix is not None:  # the image's query tokens ran once; only the prompts run here
                cache, queries = prefix, generator.num_query_tokens
                inputs_embeds = inputs_embeds[:, queries:]
            else:
                cache = None
            with self._head_for(sequences):
                output = self.model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    **{self._cache_argument: cache},
                    use_cache=True,
                    logits_to_keep=1,
                )  # logits of the last position only: the vocabulary projection is the biggest matmul at prefill
            return output.logits[:, -1], {"cache": _returned_cache(output), "mask": attention_mask}
        encoder_states = self.model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)[0]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        decoder_input = torch.full((len(items), 1), self.model.config.decoder_start_token_id, device=generator.device)
        with self._head_for(sequences):
            output = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input,
                **{self._cache_argument: cache},
                use_cache=True,
            )
        caches = {
            "cache": cache.self_attention_cache,
            "cross": cache.cross_attention_cache,
            "mask": torch.ones_like(decoder_input),
            "encoder_states": encoder_states,
            "encoder_mask": attention_mask,
        }
        return output.logits[:, -1], caches

    def _shared_image_prefix(self, inputs_embeds: torch.Tensor, items: list[PreparedRequest]) -> DynamicCache | None:
        """OPT: where several prompts about one image start together (ask_many), the KV cache of the image's query
        tokens, computed once per image and copied to each of its rows; None where every image is different.

        The query tokens come first in every row and attend only to each other, so their keys and values do not
        depend on the prompt; OPT's positions come from the attention mask, which is all ones there. The prompts
        then run over this cache: for 5 questions about one image the prefill runs 32 + 5 x prompt positions
        instead of 5 x (32 + prompt), and the prefill is most of a short answer's work on the real models.
        """
        if len(items) < 2:
            return None
        first_row: dict[int, int] = {}  # one row per distinct image (the same ImageEmbeds tensor)
        rows = [first_row.setdefault(id(item.embeds), index) for index, item in enumerate(items)]
        if len(first_row) == len(items):
            return None
        unique = list(first_row.values())
        queries = self.generator.num_query_tokens
        prefix_embeds = inputs_embeds[unique, :queries]
        output = self.model(
            inputs_embeds=prefix_embeds,
            attention_mask=torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = _returned_cache(output)
        where = torch.tensor([unique.index(row) for row in rows], device=prefix_embeds.device)
        _select_layers(cache, where)
        return cache

    def _join(self, joining: dict) -> None:
        length = max(self._mask.shape[1], joining["mask"].shape[1])
        _join_layers(self._cache, joining["cache"])
        self._mask = torch.cat([_pad(self._mask, length, 1), _pad(joining["mask"], length, 1)])
        if self._cross is not None:  # T5: encoder outputs and cross-attention caches, padded on the right
            _join_layers(self._cross, joining["cross"], left=False)
            enc = max(self._encoder_mask.shape[1], joining["encoder_mask"].shape[1])
            self._encoder_mask = torch.cat(
                [_pad(self._encoder_mask, enc, 1, left=False), _pad(joining["encoder_mask"], enc, 1, left=False)]
            )
            self._encoder_states = torch.cat(
                [_pad(self._encoder_states, enc, 1, left=False), _pad(joining["encoder_states"], enc, 1, left=False)]
            )

    @torch.inference_mode()
    def _step(self) -> None:
        started = time.perf_counter()
        # history ends with the token the model reads next (<unk> for a character only the guide writes)
        last = torch.tensor([[s.history[-1]] for s in self._running], device=self.generator.device)
        mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        with self._head_for(self._running):
            if self.generator.decoder_only:
                output = self._decode(
                    input_ids=last, attention_mask=mask, use_cache=True, **{self._cache_argument: self._cache}
                )
            else:
                cache = EncoderDecoderCache(self._cache, self._cross)
                cache.is_updated = {layer: True for layer in range(len(self._cross.layers))}
                output = self._decode(
                    encoder_outputs=BaseModelOutput(last_hidden_state=self._encoder_states),
                    attention_mask=self._encoder_mask,
                    decoder_input_ids=last,
                    decoder_attention_mask=mask,
                    **{self._cache_argument: cache},
                    use_cache=True,
                )
        self._mask = mask
        self.steps += 1
        self.stepped += len(self._running)
        self.max_running_seen = max(self.max_running_seen, len(self._running))
        if self.on_step is not None:
            self.on_step(len(self._running), time.perf_counter() - started)
        self._emit(list(self._running), output.logits[:, -1])

    @staticmethod
    def _plain(sequence: Sequence) -> bool:
        """Whether the sequence's next token is an argmax (no processors or sampling; end-of-sequence left out
        while it is under its minimum length), it asks for no log-probabilities (which need exact logits) and no
        guide masks its scores."""
        request = sequence.item.request
        return not (sequence.processors or request.params.do_sample or request.logprobs is not None or request.grammar)

    def _banned(self, sequence: Sequence) -> list[int]:
        """Tokens the sequence may not take next: end-of-sequence while under its minimum length."""
        too_short = len(sequence.generated) < sequence.item.request.params.min_new_tokens
        return list(self.generator.eos_ids) if too_short else []

    @contextmanager
    def _head_for(self, sequences: list[Sequence]):
        """A forward over `sequences`: through the head's fast GEMM where one of them takes a plain greedy token."""
        self._fast_logits = self.head is not None and any(self._plain(s) for s in sequences)
        if self._fast_logits:
            self.head.fast = True
        try:
            yield
        finally:
            if self.head is not None:
                self.head.fast = False

    def _emit(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each sequence's next token from `logits [len(sequences), vocab]`, then retire finished ones.

        Greedy rows without processors take one argmax over the whole batch (end-of-sequence left out under a
        minimum length; from fast logits, checked: deployments/head.py); rows with processors or sampling go one by
        one, on PyTorch's logits."""
        plain = [row for row, sequence in enumerate(sequences) if self._plain(sequence)]
        banned = {row: self._banned(sequences[row]) for row in plain}
        exact: dict[int, torch.Tensor] = {}
        if self._fast_logits:
            greedy = self.head.greedy(logits, plain, banned) if plain else {}
            others = [row for row in range(len(sequences)) if row not in greedy]
            if others:
                exact = dict(zip(others, self.head.exact(others)))
        else:
            greedy = dict(zip(plain, without_banned(logits, plain, banned).argmax(-1).tolist())) if plain else {}
        finished = []
        for row, sequence in enumerate(sequences):
            try:
                if self._next_token(sequence, row, logits, greedy, exact):
                    finished.append(sequence)
            except Exception as exc:  # this sequence fails (its guide, processors, callbacks); its neighbours go on
                logger.exception("choosing the next token failed for %s", sequence.item.request.request_id)
                sequence.error = exc
                finished.append(sequence)
        self._retire(finished)

    def _next_token(self, sequence: Sequence, row: int, logits, greedy: dict, exact: dict) -> bool:
        """Choose and record the sequence's next token from its row of `logits`; whether it has finished."""
        params = sequence.item.request.params
        too_short = len(sequence.generated) < params.min_new_tokens
        if row not in greedy:
            raw = exact[row] if row in exact else logits[row]
            # the model's own distribution, before the minimum length's ban and the processors change scores
            logp = raw.float().log_softmax(-1) if sequence.logprobs is not None else None
            scores = raw.unsqueeze(0).float()
            if too_short:
                scores[:, list(self.generator.eos_ids)] = -float("inf")
            if sequence.processors:
                scores = sequence.processors(torch.tensor([sequence.history], device=scores.device), scores)
            written: list[int] = []
            if sequence.guide is not None:
                scores, written = _guided(scores, sequence.guide.get_tokens(), self.generator.grammars)
            if params.do_sample:
                token = int(torch.multinomial(scores.softmax(-1), 1, generator=sequence.rng))
            else:
                token = int(scores.argmax(-1))
            if token >= raw.shape[-1]:  # a character the vocabulary cannot write: the model reads <unk>
                token = written[token - raw.shape[-1]]
        else:
            token = greedy[row]
        model_token = token if sequence.guide is None else self.generator.grammars.model_token(token)
        if sequence.logprobs is not None:
            entry = step_logprobs(logp, model_token, sequence.item.request.logprobs)
            sequence.logprobs.append((token, *entry[1:]))
        if sequence.guide is not None and token not in self.generator.eos_ids:
            sequence.guide.advance(token)
        sequence.generated.append(token)
        sequence.history.append(model_token)
        if sequence.on_tokens is not None:
            sequence.on_tokens([token])
        if sequence.assembler is not None:
            sequence.assembler.update([token])
        return (
            token in self.generator.eos_ids
            or len(sequence.generated) >= params.max_new_tokens
            or (sequence.assembler is not None and sequence.assembler.stopped)
            or sequence.cancelled.is_set()
        )

    def _retire(self, finished: list[Sequence]) -> None:
        """Hand finished sequences their results and drop their rows from the batch (one reindex for all)."""
        if not finished:
            return
        for sequence in finished:
            if sequence.error is not None:
                sequence.on_done(sequence.error)
                continue
            try:
                sequence.on_done(self.generator.result(sequence.item, sequence.generated, sequence.logprobs))
            except Exception as exc:
                sequence.on_done(exc)
        gone = {id(sequence) for sequence in finished}
        keep = [i for i, sequence in enumerate(self._running) if id(sequence) not in gone]
        self._running = [self._running[i] for i in keep]
        if not self._running:
            self._reset_batch()
            return
        rows = torch.tensor(keep, device=self.generator.device)
        first = int((self._mask[rows].sum(0) == 0).long().cumprod(0).sum())  # leading columns now all padding
        _select_layers(self._cache, rows, first)
        self._mask = self._mask[rows, first:]
        if self._cross is not None:
            _select_layers(self._cross, rows)
            self._encoder_states, self._encoder_mask = self._encoder_states[rows], self._encoder_mask[rows]
