"""The Python SDK: AsyncBlip2Client, and Blip2Client (the same calls, blocking).

    from blip2_serve.clients import Blip2Client
    with Blip2Client("127.0.0.1:8000") as client:          # or ("127.0.0.1:8001", protocol="grpc")
        print(client.caption("cat.jpg"))
        print(client.ask("cat.jpg", "how many cats are there?"))
        for piece in client.stream("cat.jpg", "Question: what is it doing? Answer:"):
            print(piece, end="", flush=True)
        best = max(client.samples("cat.jpg", n=5, temperature=0.8, seed=1), key=lambda s: s.score)
        fields = client.extract("cat.jpg", {"type": "object", "properties": {"animal": {"type": "string"}}})

Images are a path, bytes, a PIL image or a numpy array. Generation parameters (max_new_tokens, num_beams,
temperature, ...; see clients.contract) are keyword arguments. Server errors raise clients.errors types;
"unavailable" answers (overload, a replica being replaced) are retried `retries` times with exponential backoff.
`api_key=` sends `Authorization: Bearer <key>` (HTTP header, gRPC metadata).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterator, Sequence, TypeVar

import numpy as np
from blip2_serve.clients.contract import (
    EMBED_IMAGE_MODEL,
    EMBED_TEXT_MODEL,
    EMBEDDING,
    IMAGE,
    ITC_SCORE,
    ITM_MODEL,
    ITM_SCORE,
    MODEL_NAME,
    TEXT_IN,
    question_prompt,
)
from blip2_serve.clients.errors import ServiceUnavailableError
from blip2_serve.clients.images import ImageLike, image_bytes
from blip2_serve.clients.transports import make_transport

T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """One answer of `samples`: its text, why it ended ("stop" or "length"), its score (the mean log-probability of
    its tokens, to rank captions by: given when n > 1 or logprobs), and with logprobs each (token, log-probability)."""

    text: str
    finish_reason: str
    score: float | None = None
    tokens: tuple[tuple[str, float], ...] | None = None

    @classmethod
    def from_choice(cls, choice: dict) -> Sample:
        content = (choice.get("logprobs") or {}).get("content")
        tokens = tuple((entry["token"], entry["logprob"]) for entry in content) if content is not None else None
        return cls(choice["message"]["content"], choice["finish_reason"], choice.get("score"), tokens)


class AsyncBlip2Client:
    """asyncio client over KServe v2 HTTP (`protocol="http"`, default) or gRPC (`protocol="grpc"`)."""

    def __init__(
        self,
        url: str = "127.0.0.1:8000",
        protocol: str = "http",
        *,
        model: str = MODEL_NAME,
        timeout_s: float = 300.0,
        concurrency: int = 8,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
    ):
        if api_key:
            headers = {**(headers or {}), "authorization": f"Bearer {api_key}"}
        self._transport = make_transport(url, protocol, model, timeout_s, headers)
        self.concurrency = concurrency
        self.retries, self.backoff_s = retries, backoff_s

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, retried with exponential backoff (and jitter) while the server answers "unavailable":
        overloaded, or replacing a replica it lost. Other errors are raised at once."""
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except ServiceUnavailableError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(min(self.backoff_s * 2**attempt, 30.0) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    async def _infer(self, images: list[bytes], prompts: list[str] | None, generation: dict) -> list[str]:
        return await self._retrying(lambda: self._transport.infer(images, prompts, generation))

    async def caption(self, image: ImageLike, **generation) -> str:
        """A caption of one image."""
        return (await self._infer([image_bytes(image)], None, generation))[0]

    async def ask(self, image: ImageLike, question: str, **generation) -> str:
        """The answer to a question about an image (prompted as "Question: ... Answer:")."""
        return (await self.ask_many(image, [question], **generation))[0]

    async def ask_many(self, image: ImageLike, questions: Sequence[str], **generation) -> list[str]:
        """Several questions about one image, in one request: the image is sent once."""
        prompts = [question_prompt(q) for q in questions]
        return await self._infer([image_bytes(image)], prompts, generation)

    async def generate(self, image: ImageLike, prompt: str = "", **generation) -> str:
        """Text for one image and a raw prompt (no "Question:" wrapping)."""
        return (await self._infer([image_bytes(image)], [prompt], generation))[0]

    async def caption_many(
        self, images: Sequence[ImageLike], concurrency: int | None = None, **generation
    ) -> list[str]:
        """Captions of many images, at most `concurrency` requests in flight; results in input order."""
        limit = asyncio.Semaphore(concurrency or self.concurrency)

        async def one(image: ImageLike) -> str:
            async with limit:
                return await self.caption(image, **generation)

        return list(await asyncio.gather(*(one(image) for image in images)))

    async def chat(self, image: ImageLike, turns: Sequence[str], **generation) -> str:
        """The next answer in a conversation about an image. `turns` alternate question, answer, ..., question."""
        if not turns or len(turns) % 2 == 0:
            raise ValueError("turns must alternate question, answer, ... and end with a question")
        return await self._transport.chat(image_bytes(image), list(turns), generation)

    async def stream(self, image: ImageLike, prompt: str = "", **generation) -> AsyncIterator[str]:
        """The text for an image and a raw prompt, piece by piece as the model generates it."""
        async for piece in self._transport.stream(image_bytes(image), prompt, generation):
            yield piece

    async def samples(
        self,
        image: ImageLike,
        question: str | None = None,
        *,
        n: int = 1,
        logprobs: bool = False,
        response_format: dict | None = None,
        **generation,
    ) -> list[Sample]:
        """`n` answers about an image (a caption where `question` is None) from one image embedding, with their
        scores: `max(samples, key=lambda s: s.score)` is the best ranked. With `seed`, choice i is what seed + i
        gives alone (reproducible); greedy (no temperature) repeats one answer. `response_format` is OpenAI's
        (json_object / json_schema). The OpenAI route: HTTP only. generation: max_new_tokens, temperature, top_p,
        seed, stop."""
        options: dict = {"n": n}
        if logprobs:
            options["logprobs"] = True
        if response_format is not None:
            options["response_format"] = response_format
        data = image_bytes(image)
        choices = await self._retrying(lambda: self._transport.samples(data, question, options, generation))
        return [Sample.from_choice(choice) for choice in choices]

    async def extract(self, image: ImageLike, schema: dict, question: str | None = None, **generation) -> dict:
        """Fields about an image as `schema` (a JSON schema) says: decoding is guided by the schema, so the answer
        validates against it; parsed. ValueError where max_new_tokens cut the answer before it closed."""
        response_format = {"type": "json_schema", "json_schema": {"name": "fields", "schema": schema}}
        (sample,) = await self.samples(image, question, response_format=response_format, **generation)
        if sample.finish_reason != "stop":
            raise ValueError(f"the answer was cut at max_new_tokens before it closed: {sample.text!r}")
        return json.loads(sample.text)

    # ---- retrieval (a server with a `retrieval:` checkpoint)
    async def _tensors(self, model: str, tensors: dict[str, list[bytes]], outputs: list[str]) -> dict:
        return await self._retrying(lambda: self._transport.infer_tensors(model, tensors, outputs))

    async def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """[N, D] float32, L2-normalised image embeddings (blip2_embed_image)."""
        data = [image_bytes(image) for image in images]
        return (await self._tensors(EMBED_IMAGE_MODEL, {IMAGE.name: data}, [EMBEDDING.name]))[EMBEDDING.name]

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32, L2-normalised text embeddings (blip2_embed_text); cosine with images = dot product."""
        data = [text.encode("utf-8") for text in texts]
        return (await self._tensors(EMBED_TEXT_MODEL, {TEXT_IN.name: data}, [EMBEDDING.name]))[EMBEDDING.name]

    async def match(self, image: ImageLike, text: str) -> dict[str, float]:
        """{"itm": probability that `text` describes `image`, "itc": contrastive similarity} (blip2_itm)."""
        tensors = {IMAGE.name: [image_bytes(image)], TEXT_IN.name: [text.encode("utf-8")]}
        out = await self._tensors(ITM_MODEL, tensors, [ITM_SCORE.name, ITC_SCORE.name])
        return {"itm": float(out[ITM_SCORE.name].reshape(-1)[0]), "itc": float(out[ITC_SCORE.name].reshape(-1)[0])}

    async def health(self) -> dict[str, bool]:
        """{"live", "ready", "model_ready"}."""
        return await self._transport.health()

    async def metadata(self) -> dict:
        """The model's KServe v2 metadata (name, versions, inputs, outputs)."""
        return await self._transport.metadata()

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncBlip2Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Blip2Client:
    """The AsyncBlip2Client calls, blocking: they run on an event loop in a background thread of this client."""

    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", **options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blip2-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncBlip2Client:  # the transports bind to the loop they are made on
            return AsyncBlip2Client(url, protocol, **options)

        self._client = self._run(make())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def caption(self, image: ImageLike, **generation) -> str:
        """See AsyncBlip2Client.caption."""
        return self._run(self._client.caption(image, **generation))

    def ask(self, image: ImageLike, question: str, **generation) -> str:
        """See AsyncBlip2Client.ask."""
        return self._run(self._client.ask(image, question, **generation))

    def ask_many(self, image: ImageLike, questions: Sequence[str], **generation) -> list[str]:
        """See AsyncBlip2Client.ask_many."""
        return self._run(self._client.ask_many(image, questions, **generation))

    def generate(self, image: ImageLike, prompt: str = "", **generation) -> str:
        """See AsyncBlip2Client.generate."""
        return self._run(self._client.generate(image, prompt, **generation))

    def caption_many(self, images: Sequence[ImageLike], concurrency: int | None = None, **generation) -> list[str]:
        """See AsyncBlip2Client.caption_many."""
        return self._run(self._client.caption_many(images, concurrency, **generation))

    def chat(self, image: ImageLike, turns: Sequence[str], **generation) -> str:
        """See AsyncBlip2Client.chat."""
        return self._run(self._client.chat(image, turns, **generation))

    def stream(self, image: ImageLike, prompt: str = "", **generation) -> Iterator[str]:
        """See AsyncBlip2Client.stream; leaving the loop early stops the generation."""
        pieces = self._client.stream(image, prompt, **generation)
        try:
            while True:
                try:
                    yield self._run(pieces.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(pieces.aclose())

    def samples(self, image: ImageLike, question: str | None = None, **options) -> list[Sample]:
        """See AsyncBlip2Client.samples."""
        return self._run(self._client.samples(image, question, **options))

    def extract(self, image: ImageLike, schema: dict, question: str | None = None, **generation) -> dict:
        """See AsyncBlip2Client.extract."""
        return self._run(self._client.extract(image, schema, question, **generation))

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        return self._run(self._client.embed_images(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(self._client.embed_texts(texts))

    def match(self, image: ImageLike, text: str) -> dict[str, float]:
        return self._run(self._client.match(image, text))

    def health(self) -> dict[str, bool]:
        """See AsyncBlip2Client.health."""
        return self._run(self._client.health())

    def metadata(self) -> dict:
        """See AsyncBlip2Client.metadata."""
        return self._run(self._client.metadata())

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> Blip2Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
