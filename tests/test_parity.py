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


@pytest.mark.parametrize("decoding", DECODING)
@pytest.mark.parametrize("case", CASES)
def test_tokens_match_transformers_generate(app, references, case, decoding):
    indices, prompts = CASES[case]
    images = [image_bytes(i) for i in indices]
    settings = {"max_new_tokens": MAX_NEW_TOKENS, **DECODING[decoding]}
    expected = references[app.llm].generate(images, prompts, **settings)

    from blip2_serve.deployments.images import check_image

    params = GenerationParams.from_mapping(settings)
    requests = [
        GenerateRequest(f"{case}-{row}", check_image(data), prompts[row] if prompts else "", params)
        for row, data in enumerate(images)
    ]
    results = app.handle().generate_all.remote(requests).result(timeout_s=120)

    assert [list(r.token_ids) for r in results] == expected
    assert [r.text for r in results] == [references[app.llm].text(t) for t in expected]


@pytest.mark.parametrize("decoding", DECODING)
def test_tritonclient_text_matches_transformers(app, references, decoding):
    """The same parity through HTTP: stock tritonclient, binary tensors, three images and three prompts."""
    images = [image_bytes(i) for i in (2, 3, 4)]
    settings = {"max_new_tokens": MAX_NEW_TOKENS, **DECODING[decoding]}
    reference = references[app.llm]
    expected = [reference.text(t) for t in reference.generate(images, PROMPTS_3, **settings)]

    client = httpclient.InferenceServerClient(app.url)
    image_input = httpclient.InferInput("IMAGE", [3, 1], "BYTES")
    image_input.set_data_from_numpy(np.array([[d] for d in images], dtype=np.object_))
    prompt_input = httpclient.InferInput("PROMPT", [3, 1], "BYTES")
    prompt_input.set_data_from_numpy(np.array([[p.encode()] for p in PROMPTS_3], dtype=np.object_))
    result = client.infer("blip2", [image_input, prompt_input], parameters=settings)

    texts = [t.decode("utf-8") for t in result.as_numpy("TEXT").reshape(-1)]
    assert texts == expected
    assert result.as_numpy("TEXT").shape == (3, 1)
