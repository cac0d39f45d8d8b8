"""The served graph gives the same tokens as Blip2ForConditionalGeneration.generate on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from blip2_serve.deployments.types import GenerateRequest, GenerationParams

from tests.helpers import image_bytes

pytestmark = pytest.mark.serve

PROMPTS_3 = [
    "Question: what is in the picture? Answer:",
    "a",
    "describe the colour of the small block near the top left of this photo in detail",
]
CASES = {
    "batch1-caption": ([0], None),
    "batch1-prompt": ([1], ["Question: what color is it? Answer:"]),
    "batch3-prompts": ([2, 3, 4], PROMPTS_3),
    "batch3-caption": ([5, 6, 7], None),
}
DECODING = {"greedy": {"num_beams": 1}, "beam3": {"num_beams": 3}}
MAX_NEW_TOKENS = 12


def _vision_images(app) -> int:
    """How many images this app's vision stage has run through its model (cache hits not counted)."""
    stats = app.deployment("Vision").stats.remote().result(timeout_s=30)
    return sum(int(size) * count for size, count in stats["histogram"].items())


def _fresh_images(indices: list[int], variant: int) -> list[bytes]:
    """The case's pictures at a size per decoding: no other test sends them, so no cached embedding answers."""
    return [image_bytes(i, (40 + 2 * variant, 56)) for i in indices]


@pytest.mark.parametrize("decoding", DECODING)
@pytest.mark.parametrize("case", CASES)
def test_tokens_match_transformers_generate(app, references, case, decoding):
    indices, prompts = CASES[case]
    images = _fresh_images(indices, list(DECODING).index(decoding))
    settings = {"max_new_tokens": MAX_NEW_TOKENS, **DECODING[decoding]}
    expected = references[app.llm].generate(images, prompts, **settings)

    from blip2_serve.deployments.images import check_image

    params = GenerationParams.from_mapping(settings)
    requests = [
        GenerateRequest(f"{case}-{row}", check_image(data), prompts[row] if prompts else "", params)
        for row, data in enumerate(images)
    ]
    computed = _vision_images(app)
    results = app.handle().generate_many.remote(requests).result(timeout_s=120)

    assert _vision_images(app) - computed == len(images)  # the vision stage ran for each of them
    assert [list(r.token_ids) for r in results] == expected
    assert [r.text for r in results] == [references[app.llm].text(t) for t in expected]


@pytest.mark.parametrize("decoding", DECODING)
def test_tritonclient_text_matches_transformers(app, references, decoding):
    """The same parity through HTTP: stock tritonclient, binary tensors, three images and three prompts."""
    images = _fresh_images([2, 3, 4], len(DECODING) + list(DECODING).index(decoding))
    settings = {"max_new_tokens": MAX_NEW_TOKENS, **DECODING[decoding]}
    reference = references[app.llm]
    expected = [reference.text(t) for t in reference.generate(images, PROMPTS_3, **settings)]

    client = httpclient.InferenceServerClient(app.url)
    image_input = httpclient.InferInput("IMAGE", [3, 1], "BYTES")
    image_input.set_data_from_numpy(np.array([[d] for d in images], dtype=np.object_))
    prompt_input = httpclient.InferInput("PROMPT", [3, 1], "BYTES")
    prompt_input.set_data_from_numpy(np.array([[p.encode()] for p in PROMPTS_3], dtype=np.object_))
    computed = _vision_images(app)
    result = client.infer("blip2", [image_input, prompt_input], parameters=settings)

    assert _vision_images(app) - computed == len(images)
    texts = [t.decode("utf-8") for t in result.as_numpy("TEXT").reshape(-1)]
    assert texts == expected
    assert result.as_numpy("TEXT").shape == (3, 1)
