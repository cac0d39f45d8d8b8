"""Retrieval (#8), model level: the tiny ITM checkpoint loads only through from_pretrained, and RetrievalModel's
embeddings and scores equal transformers' own retrieval classes at batch 1 and 5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import image_bytes

TEXTS = ["a dog on a beach", "a red block", "two cats", "the sea at night", "a green square on grey"]


@pytest.fixture(scope="module")
def retrieval(itm_checkpoint):
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.retrieval_model import RetrievalModel

    return RetrievalModel.load(ModelConfig(checkpoint=str(itm_checkpoint), device="cpu"))


def _images(n: int, first: int = 0) -> list[Image.Image]:
    import io

    return [Image.open(io.BytesIO(image_bytes(i))).convert("RGB") for i in range(first, first + n)]


@pytest.mark.parametrize("batch", [1, 5])
def test_embeddings_and_scores_equal_transformers(itm_checkpoint, retrieval, batch):
    from transformers import (
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        Blip2TextModelWithProjection,
        Blip2VisionModelWithProjection,
    )

    processor = Blip2Processor.from_pretrained(itm_checkpoint)
    images, texts = _images(batch), TEXTS[:batch]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = (
            Blip2VisionModelWithProjection.from_pretrained(itm_checkpoint)
            .eval()(pixel_values=inputs["pixel_values"])
            .image_embeds
        )
        text = (
            Blip2TextModelWithProjection.from_pretrained(itm_checkpoint)
            .eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            .text_embeds[:, 0, :]
        )
        full = Blip2ForImageTextRetrieval.from_pretrained(itm_checkpoint).eval()
        itm = full(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(dim=-1)[:, 1]
        itc = full(**inputs, use_image_text_matching_head=False).logits_per_image.diagonal()

    pixels = retrieval.pixel_values(images)
    assert torch.equal(pixels, inputs["pixel_values"])
    np.testing.assert_allclose(retrieval.query_embeddings(pixels).numpy(), tokens.numpy(), atol=1e-5)
    pooled = torch.nn.functional.normalize(tokens.mean(dim=1), dim=-1).numpy()
    np.testing.assert_allclose(retrieval.embed_images(pixels), pooled, atol=1e-5)
    np.testing.assert_allclose(retrieval.embed_texts(texts), text.numpy(), atol=1e-5)
    served_itm, served_itc = retrieval.match(pixels, texts)
    np.testing.assert_allclose(served_itm, itm.numpy(), atol=1e-5)
    np.testing.assert_allclose(served_itc, itc.numpy(), atol=1e-5)


def test_different_inputs_differ_and_bad_text_is_refused(retrieval):
    from blip2_serve.deployments.errors import InvalidInput

    images = retrieval.embed_images(retrieval.pixel_values(_images(3)))
    texts = retrieval.embed_texts(TEXTS[:3])
    assert images.shape == (3, retrieval.dimension) and texts.shape == (3, retrieval.dimension)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert min(np.abs(images[i] - images[j]).max() for i in range(3) for j in range(i)) > 1e-3
    assert min(np.abs(texts[i] - texts[j]).max() for i in range(3) for j in range(i)) > 1e-3
    for bad in ([""], ["   "], [None]):
        with pytest.raises(InvalidInput, match="TEXT"):
            retrieval.embed_texts(bad)
    with pytest.raises(InvalidInput, match="pairs"):
        retrieval.match(retrieval.pixel_values(_images(2)), TEXTS[:1])


def _reference(itm_checkpoint, images: list, texts: list[str]) -> dict[str, np.ndarray]:
    """transformers' own outputs: pooled image embeddings, text embeddings, ITM probability, ITC score."""
    from transformers import (
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        Blip2TextModelWithProjection,
        Blip2VisionModelWithProjection,
    )

    processor = Blip2Processor.from_pretrained(itm_checkpoint)
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = Blip2VisionModelWithProjection.from_pretrained(itm_checkpoint)(pixel_values=inputs["pixel_values"])
        text = Blip2TextModelWithProjection.from_pretrained(itm_checkpoint)(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).text_embeds[:, 0, :]
        full = Blip2ForImageTextRetrieval.from_pretrained(itm_checkpoint).eval()
        itm = full(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(dim=-1)[:, 1]
        itc = full(**inputs, use_image_text_matching_head=False).logits_per_image.diagonal()
    pooled = torch.nn.functional.normalize(tokens.image_embeds.mean(dim=1), dim=-1)
    return {"image": pooled.numpy(), "text": text.numpy(), "itm": itm.numpy(), "itc": itc.numpy()}


@pytest.mark.serve
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch", [1, 5])
def test_served_embeddings_and_scores_equal_transformers(retrieval_app, itm_checkpoint, protocol, batch):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    first = 300 + 10 * batch + (5 if protocol == "grpc" else 0)  # images no other test sends: the model runs
    images = [image_bytes(i) for i in range(first, first + batch)]
    texts = TEXTS[:batch]
    reference = _reference(itm_checkpoint, _images(batch, first), texts)
    if protocol == "http":
        module, client = httpclient, httpclient.InferenceServerClient(retrieval_app.url)
        options = {}
    else:
        module, client = grpcclient, grpcclient.InferenceServerClient(retrieval_app.grpc_url)
        options = {"headers": retrieval_app.grpc_headers}
    encoded = [t.encode() for t in texts]

    def infer(model, tensors, outputs):
        inputs = []
        for name, values in tensors.items():
            tensor = module.InferInput(name, [len(values), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=np.object_))
            inputs.append(tensor)
        return client.infer(model, inputs, outputs=[module.InferRequestedOutput(n) for n in outputs], **options)

    cache_before = retrieval_app.deployment("Retrieval").stats.remote().result()["cache"]
    image = infer("blip2_embed_image", {"IMAGE": images}, ["EMBEDDING"]).as_numpy("EMBEDDING")
    np.testing.assert_allclose(image, reference["image"], atol=1e-5)
    text = infer("blip2_embed_text", {"TEXT": encoded}, ["EMBEDDING"]).as_numpy("EMBEDDING")
    np.testing.assert_allclose(text, reference["text"], atol=1e-5)
    scored = infer("blip2_itm", {"IMAGE": images, "TEXT": encoded}, ["ITM_SCORE", "ITC_SCORE"])
    np.testing.assert_allclose(scored.as_numpy("ITM_SCORE")[:, 0], reference["itm"], atol=1e-5)
    np.testing.assert_allclose(scored.as_numpy("ITC_SCORE")[:, 0], reference["itc"], atol=1e-5)
    assert image.dtype == np.float32 and image.shape == (batch, 16)
    # blip2_itm's images were embedded just before: the vision tower ran once for them (the stage's cache)
    cache = retrieval_app.deployment("Retrieval").stats.remote().result()["cache"]
    assert cache["entries"] - cache_before["entries"] == batch, (cache_before, cache)  # new images: computed here
    assert cache["hits"] - cache_before["hits"] == batch, (cache_before, cache)  # then reused by blip2_itm
    metadata = client.get_model_metadata("blip2_embed_image", **options)
    assert client.is_model_ready("blip2_itm", **options)
    names = [o["name"] for o in metadata["outputs"]] if protocol == "http" else [o.name for o in metadata.outputs]
    assert names == ["EMBEDDING"]


@pytest.mark.serve
def test_retrieval_bad_input_is_refused_and_the_server_goes_on(retrieval_app):
    import base64

    import httpx

    url = f"{retrieval_app.http}/v2/models"
    good = base64.b64encode(image_bytes(1)).decode()

    def tensor(name, data):
        return {"name": name, "datatype": "BYTES", "shape": [len(data), 1], "data": data}

    cases = {
        "not an image": ("blip2_embed_image", [tensor("IMAGE", [base64.b64encode(b"nope").decode()])], "image"),
        "empty text": ("blip2_embed_text", [tensor("TEXT", [""])], "TEXT"),
        "blank text": ("blip2_embed_text", [tensor("TEXT", ["   "])], "TEXT"),
        "unequal rows": ("blip2_itm", [tensor("IMAGE", [good, good]), tensor("TEXT", ["a"])], "rows"),
        "missing TEXT": ("blip2_itm", [tensor("IMAGE", [good])], "TEXT"),
        "wrong input": ("blip2_embed_text", [tensor("IMAGE", [good])], "unknown input"),
        "too many rows": ("blip2_embed_text", [tensor("TEXT", ["a"] * 9)], "batch size"),
    }
    with httpx.Client(timeout=60) as http:
        for case, (model, inputs, word) in cases.items():
            refused = http.post(f"{url}/{model}/infer", json={"inputs": inputs})
            assert refused.status_code == 400 and word in refused.json()["error"], (case, refused.text)
        oversize = http.post(f"{url}/blip2_embed_text/infer", content=b"x" * (3 * 1024 * 1024))
        assert oversize.status_code == 413
        assert http.get(f"{url}/blip2_nothing").status_code == 404
        answered = http.post(f"{url}/blip2_embed_text/infer", json={"inputs": [tensor("TEXT", ["a dog"])]})
        assert answered.status_code == 200 and len(answered.json()["outputs"][0]["data"]) == 16


@pytest.mark.serve
def test_openai_embeddings_route(retrieval_app, itm_checkpoint):
    import base64

    import openai

    client = openai.OpenAI(base_url=f"{retrieval_app.http}/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="blip2_embed_text", input=TEXTS[:3])
    served = np.array([d.embedding for d in result.data], dtype=np.float32)
    reference = _reference(itm_checkpoint, _images(3), TEXTS[:3])["text"]
    np.testing.assert_allclose(served, reference, atol=1e-5)
    assert result.usage.prompt_tokens > 3 and [d.index for d in result.data] == [0, 1, 2]
    packed = client.embeddings.create(model="blip2_embed_text", input="a dog on a beach", encoding_format="base64")
    vector = packed.data[0].embedding
    if isinstance(vector, str):  # the openai package may decode base64 itself
        vector = np.frombuffer(base64.b64decode(vector), dtype="<f4")
    np.testing.assert_allclose(np.asarray(vector, dtype=np.float32), reference[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="blip2_embed_text", input=[""])


@pytest.mark.serve
def test_index_search_and_match_from_the_cli(retrieval_app, tmp_path):
    """50 images indexed (resumably) through the server; search's top-k equals brute-force cosine over the same
    embeddings; `match` prints both scores."""
    import subprocess
    import sys
    from pathlib import Path

    from blip2_serve.clients import Blip2Client
    from blip2_serve.clients.image_index import ImageIndex

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(50):
        (folder / f"{i:02d}.png").write_bytes(image_bytes(i))
    cli = str(Path(sys.executable).parent / "blip2-serve")
    index = tmp_path / "images.usearch"
    base = ["--url", retrieval_app.url, "--no-progress"]
    # a first run over 20 images, then the whole folder: the second run adds only the other 30
    partial = tmp_path / "partial"
    partial.mkdir()
    for i in range(20):
        (partial / f"{i:02d}.png").symlink_to(folder / f"{i:02d}.png")
    subprocess.run([cli, "index", str(partial), "--out", str(index), *base], check=True, capture_output=True)
    assert len(ImageIndex(index)) == 20
    meta = ImageIndex(index)
    meta.paths = [str(folder / Path(p).name) for p in meta.paths]  # the same files, under the folder's paths
    meta.save()
    ran = subprocess.run([cli, "index", str(folder), "--out", str(index), *base], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    loaded = ImageIndex(index)
    assert len(loaded) == 50 and sorted(loaded.paths) == sorted(str(p) for p in folder.iterdir())

    with Blip2Client(retrieval_app.url) as client:
        files = [Path(p).read_bytes() for p in loaded.paths]
        images = np.concatenate([client.embed_images(files[i : i + 8]) for i in range(0, len(files), 8)])
        query = client.embed_texts(["a red block on a blue ground"])[0]
    brute = np.argsort(-(images @ query))[:5]
    found = subprocess.run(
        [cli, "search", str(index), "a red block on a blue ground", "-k", "5", "--url", retrieval_app.url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    printed = [line.split("\t") for line in found if line]
    assert [p for _, p in printed] == [loaded.paths[i] for i in brute]
    np.testing.assert_allclose([float(s) for s, _ in printed], (images @ query)[brute], atol=1e-4)

    matched = subprocess.run(
        [cli, "match", str(folder / "03.png"), "a dog", "--url", retrieval_app.url], capture_output=True, text=True
    )
    assert matched.returncode == 0 and matched.stdout.startswith("itm ") and "itc " in matched.stdout
