"""Retrieval (#8), model level: the tiny ITM checkpoint loads only through from_pretrained, and RetrievalModel's
embeddings and scores equal transformers' own retrieval classes at batch 1 and 5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import image_bytes

TEXTS = ["a dog on a beach", "a red block", "two cats", "the sea at night", "a green square on grey"]


@pytest.fixture(scope="session")
def itm_checkpoint(tmp_path_factory):
    from exporters.tiny import make_tiny_itm_checkpoint

    return make_tiny_itm_checkpoint(tmp_path_factory.mktemp("itm") / "itm")


@pytest.fixture(scope="module")
def retrieval(itm_checkpoint):
    from deployments.config import ModelConfig
    from deployments.retrieval_model import RetrievalModel

    return RetrievalModel.load(ModelConfig(checkpoint=str(itm_checkpoint)))


def _images(n: int) -> list[Image.Image]:
    import io

    return [Image.open(io.BytesIO(image_bytes(i))).convert("RGB") for i in range(n)]


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
    from deployments.errors import InvalidInput

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
