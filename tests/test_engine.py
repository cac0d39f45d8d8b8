"""Iteration-level batching in the LLM stage: requests join and leave between decode steps, tokens unchanged."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.engine import ContinuousBatcher, Sequence
from blip2_serve.deployments.generator import LanguageGenerator
from blip2_serve.deployments.images import check_image
from blip2_serve.deployments.kvcache import SlabLayer, slab_wanted
from blip2_serve.deployments.types import GenerateRequest, GenerationParams
from blip2_serve.deployments.vision_encoder import VisionEncoder
from transformers.cache_utils import DynamicLayer

from tests.helpers import image_bytes


@pytest.fixture(scope="module", params=["opt", "t5"])
def parts(request, checkpoints):
    model = ModelConfig(checkpoint=str(checkpoints[request.param]), device="cpu", greedy_screen="on")  # as served
    vision, generator = VisionEncoder(model), LanguageGenerator(model)
    embeds = vision.encode([vision.preprocess(check_image(image_bytes(800 + i))) for i in range(6)])
    return generator, embeds


def _submit(engine, prepared, **kwargs) -> Future:
    future: Future = Future()
    engine.submit(
        Sequence(
            prepared,
            on_done=lambda r: future.set_exception(r) if isinstance(r, BaseException) else future.set_result(r),
            **kwargs,
        )
    )
    return future


@pytest.mark.parametrize("kv_cache", ["auto", "dynamic"])
def test_joining_and_leaving_keeps_greedy_tokens(parts, kv_cache):
    """Six requests of different prompts and lengths through a 4-wide engine = each one alone through generate, with
    the running batch's KV cache in preallocated buffers (the default) and in transformers' DynamicCache."""
    generator, embeds = parts
    prompts = ["", "a", "Question: what is in the picture? Answer:", "describe the cat in detail please", "b c", ""]
    limits = [12, 30, 5, 20, 8, 40]
    prepared = [
        generator.prepare(
            GenerateRequest(
                f"r{i}", None, p, GenerationParams(max_new_tokens=n, repetition_penalty=1.3 if i == 3 else 1.0)
            ),
            e,
        )
        for i, (p, n, e) in enumerate(zip(prompts, limits, embeds))
    ]
    alone = [generator.run([p])[0].token_ids for p in prepared]
    engine = ContinuousBatcher(generator, max_running=4)
    assert engine.slab  # the default ("auto")
    engine.slab = slab_wanted(kv_cache)  # before any sequence: the batch's first prefill reads it
    caches: list[type] = []
    engine.on_step = lambda *_: caches.append(type(engine._cache.layers[0]))
    futures = []
    for item in prepared:
        futures.append(_submit(engine, item))
        time.sleep(0.002)
    assert [f.result(timeout=120).token_ids for f in futures] == alone
    assert engine.max_running_seen > 1
    assert set(caches) == {SlabLayer if kv_cache == "auto" else DynamicLayer}, caches


def test_prompts_about_one_image_share_its_prefix_and_keep_greedy_tokens(parts):
    """ask_many: prompts that share one ImageEmbeds tensor start together; OPT runs the image's query tokens once
    (a prefix cache copied to each row) and every answer equals that prompt alone through generate."""
    generator, embeds = parts
    prompts = ["", "Question: what is it? Answer:", "Question: what colour is the block on the left? Answer:", "a"]
    shared = [
        generator.prepare(GenerateRequest(f"q{i}", None, p, GenerationParams(max_new_tokens=9)), embeds[1])
        for i, p in enumerate(prompts)
    ]
    other = generator.prepare(GenerateRequest("o", None, "b", GenerationParams(max_new_tokens=9)), embeds[2])
    batch = [*shared[:2], other, *shared[2:]]  # two images in one admission: rows map to their own prefix
    alone = [generator.run([p])[0].token_ids for p in batch]
    engine = ContinuousBatcher(generator, max_running=8)
    if generator.decoder_only:
        cache = engine._shared_image_prefix(generator.embed_inputs(generator.collate(batch)[0], batch), batch)
        assert cache is not None and cache.layers[0].keys.shape[0] == len(batch)
        assert cache.layers[0].keys.shape[2] == generator.num_query_tokens
    gate = threading.Event()
    held = engine.run_exclusive(gate.wait, 60)  # the engine waits here, so that all five start in one prefill
    futures = [_submit(engine, item) for item in batch]
    gate.set()
    held.result(timeout=60)
    assert [f.result(timeout=120).token_ids for f in futures] == alone
    assert engine.steps == max(len(f.result().token_ids) for f in futures) - 1  # one admission, then steps


class _SlowQueue:
    """The engine's incoming queue with a pause after each put: a hand-over the engine could take in parts would be
    taken in parts (the engine steps every ~ms meanwhile)."""

    def __init__(self, inner):
        self._inner = inner

    def put(self, item):
        self._inner.put(item)
        time.sleep(0.03)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_hand_over_is_admitted_in_one_prefill_while_the_engine_steps(parts):
    """generate_many's prompts (submit_many) join a running batch in one admission, however slowly they are handed
    over: the prefill is shared (OPT: the image prefix; T5: one encoder pass) instead of split between steps."""
    generator, embeds = parts
    engine = ContinuousBatcher(generator, max_running=8)
    admissions: list[int] = []
    admit = engine._admit
    engine._admit = lambda sequences: admissions.append(len(sequences)) or admit(sequences)
    engine._incoming = _SlowQueue(engine._incoming)
    long = GenerateRequest("long", None, "", GenerationParams(max_new_tokens=60, min_new_tokens=60))
    running = _submit(engine, generator.prepare(long, embeds[0]))
    while engine.steps < 2:  # decoding: the engine takes what waits between its steps
        time.sleep(0.001)
    futures: list[Future] = []
    sequences = []
    for i in range(3):
        future: Future = Future()
        request = GenerateRequest(f"q{i}", None, f"question {i}", GenerationParams(max_new_tokens=4))
        sequences.append(Sequence(generator.prepare(request, embeds[1]), on_done=future.set_result))
        futures.append(future)
    engine.submit_many(sequences)
    [f.result(timeout=120) for f in [*futures, running]]
    assert admissions == [1, 3], admissions


def test_interactive_sequences_are_admitted_before_background_ones(parts):
    """Batch API lines (BACKGROUND) queued first still wait for an interactive request when the batch is full."""
    from blip2_serve.deployments.types import BACKGROUND

    generator, embeds = parts
    engine = ContinuousBatcher(generator, max_running=1)
    admitted: list[str] = []
    admit = engine._admit
    engine._admit = lambda sequences: admitted.extend(s.item.request.request_id for s in sequences) or admit(sequences)
    gate = threading.Event()
    held = engine.run_exclusive(gate.wait, 60)  # everything below queues while the engine waits here
    requests = [("b1", BACKGROUND), ("b2", BACKGROUND), ("i1", 0)]
    futures = [
        _submit(engine, generator.prepare(GenerateRequest(name, None, "", GenerationParams(max_new_tokens=2), p), e))
        for (name, p), e in zip(requests, embeds)
    ]
    gate.set()
    held.result(timeout=60)
    [f.result(timeout=120) for f in futures]
    assert admitted == ["i1", "b1", "b2"], admitted


def test_seeded_sampling_does_not_depend_on_the_batch(parts):
    generator, embeds = parts
    params = GenerationParams(max_new_tokens=10, do_sample=True, seed=5, temperature=0.8, top_k=40)
    item = generator.prepare(GenerateRequest("s", None, "a", params), embeds[0])
    engine = ContinuousBatcher(generator, max_running=4)
    alone = _submit(engine, item).result(timeout=60).token_ids
    crowd = [
        _submit(
            engine,
            generator.prepare(GenerateRequest(f"c{i}", None, "b", GenerationParams(max_new_tokens=20)), embeds[i]),
        )
        for i in range(1, 4)
    ]
    again = _submit(engine, item).result(timeout=60).token_ids
    [f.result(timeout=60) for f in crowd]
    assert alone == again


def test_log_probabilities_beside_plain_greedy_rows(parts):
    """Rows that ask for log-probabilities (exact logits) decode in one batch with plain greedy rows (the checked
    fast projection) and join it at different times: every row keeps its tokens, and each asked row's
    log-probabilities are those of the model's raw distribution for the request alone (generate's output_logits:
    before the repetition penalty and the minimum length's ban), with its top alternatives, most likely first."""
    generator, embeds = parts
    rows = [  # (prompt, max_new_tokens, logprobs, repetition_penalty, min_new_tokens)
        ("", 10, None, 1.0, 0),
        ("a", 8, 3, 1.0, 0),
        ("Question: what is it? Answer:", 12, None, 1.0, 0),
        ("b c", 9, 0, 1.4, 0),
        ("", 7, 5, 1.0, 7),
    ]
    prepared = [
        generator.prepare(
            GenerateRequest(
                f"r{i}",
                None,
                prompt,
                GenerationParams(max_new_tokens=n, repetition_penalty=penalty, min_new_tokens=least),
                logprobs=k,
            ),
            embeds[i],
        )
        for i, (prompt, n, k, penalty, least) in enumerate(rows)
    ]
    alone = [generator.run([p])[0] for p in prepared]
    engine = ContinuousBatcher(generator, max_running=8)
    futures = []
    for item in prepared:
        futures.append(_submit(engine, item))
        time.sleep(0.002)
    results = [f.result(timeout=120) for f in futures]
    assert engine.max_running_seen > 1
    for (_, _, k, penalty, least), got, want in zip(rows, results, alone):
        assert got.token_ids == want.token_ids
        if k is None:
            assert got.logprobs is None and got.score is None
            continue
        assert len(got.logprobs) == len(got.token_ids) == len(want.logprobs)
        for mine, theirs in zip(got.logprobs, want.logprobs):
            assert mine.token_id == theirs.token_id and mine.logprob <= 0
            assert abs(mine.logprob - theirs.logprob) < 1e-4, (mine, theirs)
            assert len(mine.top) == k and [t[0] for t in mine.top] == [t[0] for t in theirs.top]
            assert [t[2] for t in mine.top] == sorted((t[2] for t in mine.top), reverse=True)
            assert mine.text == generator.tokenizer.decode([mine.token_id])
            if mine.top and penalty == 1.0 and not least:  # greedy on the raw distribution: the chosen one is first
                assert mine.top[0][0] == mine.token_id and mine.top[0][2] == mine.logprob
        assert got.score == sum(t.logprob for t in got.logprobs) / len(got.logprobs)


def test_a_sequence_whose_token_step_fails_fails_alone(parts):
    """A stream whose event loop has gone makes its `on_tokens` raise (RuntimeError: Event loop is closed) in the
    middle of a step, at its first token and later: that request fails with the error, its neighbours keep their
    greedy tokens, and the engine takes the next request (it used to lose its thread and every request in hand)."""
    generator, embeds = parts
    prepared = [
        generator.prepare(GenerateRequest(f"n{i}", None, "", GenerationParams(max_new_tokens=8)), embeds[i])
        for i in range(4)
    ]
    alone = [generator.run([p])[0].token_ids for p in prepared]
    engine = ContinuousBatcher(generator, max_running=4)

    def gone_after(count):
        seen = []

        def on_tokens(tokens):
            seen.extend(tokens)
            if len(seen) > count:
                raise RuntimeError("Event loop is closed")

        return on_tokens

    futures = [
        _submit(engine, prepared[0]),
        _submit(engine, prepared[1], on_tokens=gone_after(0)),
        _submit(engine, prepared[2]),
        _submit(engine, prepared[3], on_tokens=gone_after(3)),
    ]
    for index in (1, 3):
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            futures[index].result(timeout=120)
    assert [futures[i].result(timeout=120).token_ids for i in (0, 2)] == [alone[0], alone[2]]
    assert _submit(engine, prepared[1]).result(timeout=120).token_ids == alone[1]
    assert engine.running == 0


def test_cancelled_sequence_leaves_at_the_next_step(parts):
    generator, embeds = parts
    item = generator.prepare(
        GenerateRequest("long", None, "", GenerationParams(max_new_tokens=200 if not generator.decoder_only else 150)),
        embeds[0],
    )
    engine = ContinuousBatcher(generator, max_running=4)
    cancelled, seen = threading.Event(), []
    future = _submit(
        engine,
        item,
        cancelled=cancelled,
        on_tokens=lambda tokens: seen.extend(tokens) or (len(seen) >= 5 and cancelled.set()),
    )
    result = future.result(timeout=60)
    assert 5 <= len(result.token_ids) <= 6 and engine.running == 0


@pytest.mark.serve
def test_a_short_request_sent_during_a_long_one_finishes_first(apps):
    """A 64-token answer streams; once it is decoding, a 4-token request is sent: it joins and ends first."""
    import base64
    import json

    import httpx

    app = apps["opt"]
    handle = app.handle()
    short = GenerateRequest(
        "short", check_image(image_bytes(851)), "", GenerationParams(max_new_tokens=4, min_new_tokens=4)
    )
    handle.generate.remote(short).result(timeout_s=120)  # warm: its image is cached, its path compiled
    url = "data:image/png;base64," + base64.b64encode(image_bytes(850)).decode()
    body = {
        "model": "blip2",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    finished: dict[str, float] = {}
    with httpx.stream("POST", f"{app.http}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        while '"content": "' not in (line := next(lines)) or '"content": ""' in line:
            pass  # until the first generated text: the long answer is decoding
        thread = threading.Thread(
            target=lambda: finished.__setitem__(
                "short", (handle.generate.remote(short).result(timeout_s=120), time.perf_counter())[1]
            )
        )
        thread.start()
        usage = None
        for line in lines:
            if line.startswith("data: {") and '"usage": {' in line:
                usage = json.loads(line[6:])["usage"]
        finished["long"] = time.perf_counter()
    thread.join()
    assert usage["completion_tokens"] == 64, "the long answer must really be long"
    assert finished["short"] < finished["long"]


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_the_fast_output_projection_keeps_the_exact_argmax(kind):
    """deployments/head.py: each screen (bf16, int8) is within its stated margin of the exact logits for every
    token; given screen values moved by up to that margin in the worst direction (the runner-up raised, the maximum
    lowered, so that the screen's argmax is wrong), each row's token is still the exact argmax, from a float64
    recount of the candidates; banned tokens are never taken; whole rows are the full projection's."""
    import torch
    from blip2_serve.deployments.head import GreedyHead, screen_kinds
    from torch import nn

    if kind not in screen_kinds():
        pytest.skip(f"this CPU computes no {kind} screen (it has {screen_kinds()})")

    torch.manual_seed(0)
    linear = nn.Linear(256, 500, bias=True)
    with torch.no_grad():
        linear.weight.mul_(8)
        linear.bias.mul_(50)
        linear.weight[7] = linear.weight[3] + 1e-7  # two columns in a near tie for every input
        linear.bias[7] = linear.bias[3]
    model = nn.Module()
    model.lm_head = linear
    model.get_output_embeddings = lambda: model.lm_head
    model.set_output_embeddings = lambda module: setattr(model, "lm_head", module)
    head = GreedyHead.install(model, kind=kind)
    assert head is model.lm_head and head.kind == kind and GreedyHead.install(model) is head
    head.screen_rows = None  # the screen at every row count (int8 takes at most 4 by default: below)
    inputs = torch.randn(64, 256) * torch.logspace(-2, 2, 64).unsqueeze(1)  # rows of every scale
    inputs[:3] = inputs[:3] * 0.01 + linear.weight[3].detach() / 8  # rows 0-2: 3 and 7 lead, in a near tie
    with torch.inference_mode():
        head.fast = True
        fast = head(inputs)
        head.fast = False
        logits = inputs.double() @ linear.weight.double().T + linear.bias.double()
        exact = logits.argmax(-1).tolist()
        slack, relative = head.margin(inputs)
        margin = slack + relative * fast.double().abs()
        assert ((fast.double() - logits).abs() <= margin).all()  # the bound holds, every row and token
        assert ((fast.double() - logits).abs() > margin / 8).any()  # and is not loose beyond reason
        # each part of the bound on its own, where it is the only error: the screen's rounding of its output (inputs
        # exact in bf16, weights exact in the screen's form), of the weights (inputs exact), of the inputs (weights
        # exact)
        exact_inputs = inputs.to(torch.bfloat16).float()
        screened = head.screen_weight()
        for rounds, weight, rows in (
            ("output", screened, exact_inputs),
            ("weights", linear.weight, exact_inputs),
            ("inputs", screened, inputs),
        ):
            alone = nn.Linear(256, 500, bias=False)
            alone.weight.copy_(weight)
            part = GreedyHead(alone, kind=kind)
            part.screen_rows = None
            if weight is screened:  # the screen's form of weights already in it is themselves
                assert torch.equal(part.screen_weight(), screened), rounds
            part.fast = True
            screen = part(rows).double()
            error = (screen - rows.double() @ weight.double().T).abs()
            slack, relative = part.margin(rows)
            assert (error <= slack + relative * screen.abs()).all(), rounds
        adversarial = fast.clone()
        for row, token in enumerate(exact[:3]):
            runner_up = 7 if token == 3 else 3
            adversarial[row, token] -= 0.9 * margin[row, token]
            adversarial[row, runner_up] += 0.9 * margin[row, runner_up]
        assert [int(t) for t in adversarial[:3].argmax(-1)] != exact[:3]  # the screen's argmax alone would be wrong
        tokens = head.greedy(adversarial, list(range(64)))
        assert [tokens[row] for row in range(64)] == exact
        assert head.rows == 64 and head.checked < 64 * 20  # a few candidates a row, not the vocabulary
        banned = head.greedy(fast, [0, 1], {0: [exact[0]], 1: []})
        assert banned[0] != exact[0] and banned[1] == exact[1]
        assert torch.equal(head.exact([0, 4]), linear(inputs[[0, 4]]))  # whole rows: PyTorch's own logits
        # beside a packed projection, the screen takes a few rows only; more take the packed logits' own argmax
        packed = GreedyHead(linear, packed=True, kind=kind)
        packed.fast = True
        assert packed(inputs[:4]).dtype == torch.float32 and packed.screened
        full = packed(inputs[:8])
        assert not packed.screened and torch.equal(full, packed.full(inputs[:8]))
        assert list(packed.greedy(full, list(range(8))).values()) == full.argmax(-1).tolist()
        # without one, the bf16 screen takes every row count and the int8 one at most as few
        alone = GreedyHead(linear, kind=kind)
        alone.fast = True
        alone(inputs[:8])
        assert (alone.screened == "screen") == (kind == "bf16")
        # prove_packed: over the screen's rows the packed fp32 logits are a screen too, within their own margin of
        # the exact logits, and their argmax is proven as the screen's is; whole logits are PyTorch's
        proven = GreedyHead(linear, packed=True, kind=kind, prove_packed=True)
        proven.fast = True
        ties = inputs.clone()  # rows 0-2: 3 and 7 lead by far, in a tie far below fp32's rounding
        ties[:3] = linear.weight[3].detach() * 10 + torch.randn(3, 256) * 0.01
        logits = ties.double() @ linear.weight.double().T + linear.bias.double()
        exact = logits.argmax(-1).tolist()
        assert set(exact[:3]) <= {3, 7}
        wide = proven(ties)
        assert proven.screened == "packed" and torch.equal(wide, proven.packed(ties))
        slack, relative = proven.margin(ties)
        wide_margin = slack + relative * wide.double().abs()
        assert ((wide.double() - logits).abs() <= wide_margin).all()
        moved = wide.clone()
        for row, token in enumerate(exact[:3]):
            runner_up = 7 if token == 3 else 3
            moved[row, token] -= 0.9 * wide_margin[row, token]
            moved[row, runner_up] += 0.9 * wide_margin[row, runner_up]
        assert [int(t) for t in moved[:3].argmax(-1)] != exact[:3]
        proven_tokens = proven.greedy(moved, list(range(64)))
        assert [proven_tokens[row] for row in range(64)] == exact
        assert proven.packed_rows == 64 and proven.checked < 64 * 20
        assert torch.equal(proven.exact([0, 4]), linear(ties[[0, 4]]))
        proven.fast = False
        assert torch.equal(proven(ties), linear(ties))  # outside the engine's greedy steps: PyTorch's


def test_t5_engine_uses_the_checked_output_projection(checkpoints):
    """On CPU a Flan-T5 engine takes greedy tokens through the checked bf16 screen and they equal generate's (OPT's
    engine does too: its tokens are compared with generate's across tests/test_engine.py and tests/test_parity.py)."""
    model = ModelConfig(checkpoint=str(checkpoints["t5"]), device="cpu", greedy_screen="on")
    vision, generator = VisionEncoder(model), LanguageGenerator(model)
    embeds = vision.encode([vision.preprocess(check_image(image_bytes(850 + i))) for i in range(4)])
    prepared = [
        generator.prepare(GenerateRequest(f"h{i}", None, "", GenerationParams(max_new_tokens=10, min_new_tokens=i)), e)
        for i, e in enumerate(embeds)
    ]
    alone = [generator.run([p])[0].token_ids for p in prepared]
    engine = ContinuousBatcher(generator, max_running=4)
    assert engine.head is not None
    futures = [_submit(engine, item) for item in prepared]
    assert [f.result(timeout=120).token_ids for f in futures] == alone
    assert engine.head.rows >= 4 and engine.head.packed is None  # T5 keeps PyTorch's linear for whole rows
    opt = LanguageGenerator(
        ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", greedy_screen="on", cpu_linear="onednn")
    )
    assert ContinuousBatcher(opt).head.packed is not None  # OPT packs its layers, the head's whole rows too
    small = LanguageGenerator(ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", greedy_screen="on"))
    assert ContinuousBatcher(small).head.packed is None  # "auto" packs no layer as small as the tiny ones
    # "auto" (the default) leaves a projection as small as the tiny checkpoints' unscreened: the proof would cost
    # more than the bytes it saves
    unscreened = LanguageGenerator(ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", cpu_linear="onednn"))
    assert ContinuousBatcher(unscreened).head is None
    assert type(unscreened.model.language_model.get_output_embeddings()).__name__ == "PackedLinear"


def test_packed_opt_engine_tokens_equal_transformers_generate(checkpoints, references):
    """cpu_linear "onednn" (what "auto" does for a published OPT's layers; the tiny ones are under its threshold):
    the engine's greedy tokens through packed layers and a packed, screened head equal transformers' generate on
    PyTorch's own layers (the model card's run), batched, with min_new_tokens bans."""
    packed = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", greedy_screen="on", cpu_linear="onednn")
    vision, generator = VisionEncoder(packed), LanguageGenerator(packed)
    assert type(generator.model.language_model.model.decoder.layers[0].fc1).__name__ == "PackedLinear"
    images = [image_bytes(870 + i) for i in range(4)]
    embeds = vision.encode([vision.preprocess(check_image(b)) for b in images])
    prepared = [
        generator.prepare(GenerateRequest(f"p{i}", None, "", GenerationParams(max_new_tokens=10, min_new_tokens=i)), e)
        for i, e in enumerate(embeds)
    ]
    engine = ContinuousBatcher(generator, max_running=4)
    futures = [_submit(engine, item) for item in prepared]
    served = [list(f.result(timeout=120).token_ids) for f in futures]
    expected = [
        references["opt"].generate([b], None, max_new_tokens=10, min_new_tokens=i)[0] for i, b in enumerate(images)
    ]
    assert engine.head.packed is not None and engine.head.rows >= 4
    assert served == expected


def test_compiled_decode_steps_keep_the_greedy_tokens(checkpoints):
    """`compile_decode`: the engine's decode steps run through torch.compile (dynamic shapes: three requests of
    different lengths join and leave) and give the tokens of the same engine uncompiled, with the same layers
    (PyTorch's linear layers and the full output projection, which compiling implies)."""
    import torch
    from torch._dynamo.utils import counters

    def tokens(**settings) -> tuple[list, ContinuousBatcher]:
        model = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", **settings)
        vision, generator = VisionEncoder(model), LanguageGenerator(model)
        embeds = vision.encode([vision.preprocess(check_image(image_bytes(900 + i))) for i in range(3)])
        engine = ContinuousBatcher(generator, max_running=4)
        futures = []
        for i, (prompt, limit) in enumerate(zip(["", "a photo of", "Question: what? Answer:"], [12, 6, 9])):
            request = GenerateRequest(f"c{i}", None, prompt, GenerationParams(max_new_tokens=limit))
            futures.append(_submit(engine, generator.prepare(request, embeds[i])))
            time.sleep(0.01)
        return [f.result(timeout=300).token_ids for f in futures], engine

    expected, eager = tokens(cpu_linear="torch", greedy_screen="off")
    assert eager._decode is eager.model
    compiled_before = counters["stats"]["unique_graphs"]
    got, engine = tokens(compile_decode=True)
    assert isinstance(engine._decode, torch._dynamo.eval_frame.OptimizedModule) and engine.head is None
    assert counters["stats"]["unique_graphs"] > compiled_before  # the steps went through the compiler
    assert got == expected
    with pytest.raises(ValueError, match="oneDNN"):
        ModelConfig(checkpoint="x", compile_decode=True, cpu_linear="onednn")


def test_t5_engine_with_packed_decode_layers_keeps_greedy_tokens(checkpoints, references, monkeypatch):
    """A Flan-T5 whose decode layers are packed and whose output projection's packed logits are proven (what "auto"
    gives a published T5; the threshold is lowered for the tiny one): ten captions stepped together, joining and
    leaving, with min_new_tokens bans, equal transformers' generate on PyTorch's own layers, one image at a time
    (the model card's loop); steps of more than the int8/bf16 screen's rows went through the proven packed GEMM."""
    from blip2_serve.deployments import loading

    monkeypatch.setattr(loading, "PACK_MIN_WEIGHTS", 1)
    model = ModelConfig(checkpoint=str(checkpoints["t5"]), device="cpu", greedy_screen="on")
    vision, generator = VisionEncoder(model), LanguageGenerator(model)
    t5 = generator.model.language_model
    assert type(t5.decoder.block[0].layer[2].DenseReluDense.wo).__name__ == "PackedLinear"
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo).__name__ == "Linear"
    images = [image_bytes(880 + i) for i in range(10)]
    embeds = vision.encode([vision.preprocess(check_image(b)) for b in images])
    prepared = [
        generator.prepare(
            GenerateRequest(f"w{i}", None, "", GenerationParams(max_new_tokens=8 + i % 5, min_new_tokens=i % 3)), e
        )
        for i, e in enumerate(embeds)
    ]
    engine = ContinuousBatcher(generator, max_running=12)
    assert generator.model.plain_rows_pending  # timed at the first request, in the engine's turn (loading.tune_once)
    served = [list(f.result(timeout=120).token_ids) for f in [_submit(engine, item) for item in prepared]]
    assert not generator.model.plain_rows_pending
    expected = [
        references["t5"].generate([b], None, max_new_tokens=8 + i % 5, min_new_tokens=i % 3)[0]
        for i, b in enumerate(images)
    ]
    assert served == expected
    assert engine.head.prove_packed and engine.head.packed_rows > 0  # rows proven on the packed logits
