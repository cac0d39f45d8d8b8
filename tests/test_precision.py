"""fp32/fp16/bf16 through config, int8/int4 (bitsandbytes) for the LLM stage; on CPU here, the same code on GPU."""

from __future__ import annotations

import pytest
import torch
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.generator import LanguageGenerator
from blip2_serve.deployments.images import check_image
from blip2_serve.deployments.types import GenerateRequest, GenerationParams
from blip2_serve.deployments.vision_encoder import VisionEncoder

from tests.helpers import image_bytes


def _run(checkpoint, vision_dtype: str, llm: dict) -> tuple[VisionEncoder, LanguageGenerator, list[int]]:
    vision = VisionEncoder(ModelConfig(checkpoint=str(checkpoint), dtype=vision_dtype, device="cpu"))
    generator = LanguageGenerator(ModelConfig(checkpoint=str(checkpoint), device="cpu", **llm))
    image = check_image(image_bytes(3))
    (embeds,) = vision.encode([vision.preprocess(image)])
    request = GenerateRequest("p", None, "a", GenerationParams(max_new_tokens=6))
    (result,) = generator.run([generator.prepare(request, embeds)])
    assert not isinstance(result, BaseException), result
    return vision, generator, list(result.token_ids)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision(checkpoints, dtype, torch_dtype):
    vision, generator, tokens = _run(checkpoints["opt"], dtype, {"dtype": dtype})
    model = vision.backend.model
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch_dtype
    # transformers keeps the Q-Former in fp32 under fp16 (not bf16), as in Blip2ForConditionalGeneration
    qformer_dtype = torch.float32 if dtype == "fp16" else torch_dtype
    assert model.qformer.layernorm.weight.dtype == qformer_dtype
    assert generator.model.language_model.lm_head.weight.dtype == torch_dtype
    assert len(tokens) == 6


def test_fp32_is_the_cpu_default(checkpoints):
    vision, generator, _ = _run(checkpoints["t5"], "auto", {})
    assert vision.backend.dtype == generator.dtype == torch.float32


@pytest.mark.parametrize("quantization,layer", [("int8", "Linear8bitLt"), ("int4", "Linear4bit")])
def test_bitsandbytes_quantized_llm(checkpoints, quantization, layer):
    _, generator, tokens = _run(checkpoints["opt"], "fp32", {"quantization": quantization})
    fc1 = generator.model.language_model.model.decoder.layers[0].fc1
    assert type(fc1).__name__ == layer
    assert len(tokens) == 6


@pytest.mark.parametrize("llm", ["opt", "t5"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_served_tokens_equal_transformers_in_the_same_precision(checkpoints, llm, dtype):
    """Precision parity on CPU: the vision stage and the continuous-batching engine in `dtype`, four images admitted
    together, give each image the greedy tokens of transformers' `generate` loaded in the same dtype (the model
    card's `torch_dtype`), one image at a time. fp16 and bitsandbytes are checked on a GPU (bench/device_check.py)."""
    from concurrent.futures import Future

    from blip2_serve.deployments.engine import ContinuousBatcher, Sequence

    from tests.helpers import Reference

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = ModelConfig(checkpoint=str(checkpoints[llm]), dtype=dtype, device="cpu")
    vision, generator = VisionEncoder(model), LanguageGenerator(model)
    assert generator.dtype == vision.backend.dtype == torch_dtype
    pictures = [image_bytes(60 + i) for i in range(4)]
    embeds = vision.encode([vision.preprocess(check_image(data)) for data in pictures])
    engine = ContinuousBatcher(generator, max_running=4)
    futures = []
    sequences = []
    for index, embedding in enumerate(embeds):
        request = GenerateRequest(f"p{index}", None, "", GenerationParams(max_new_tokens=10))
        future: Future = Future()
        futures.append(future)
        sequences.append(Sequence(generator.prepare(request, embedding), on_done=future.set_result))
    engine.submit_many(sequences)
    served = [list(future.result(timeout=120).token_ids) for future in futures]

    reference = Reference(checkpoints[llm], dtype=torch_dtype)
    expected = [reference.generate([data], None, max_new_tokens=10)[0] for data in pictures]
    assert served == expected
    assert len({tuple(tokens) for tokens in expected}) > 1  # the images differ in what they give


@pytest.mark.parametrize("llm", ["opt", "t5"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_tokens_equal_transformers_with_the_same_bitsandbytes_config(checkpoints, llm, quantization):
    """bitsandbytes parity on CPU: the LLM stage quantized by `quantization` gives transformers' greedy tokens from
    the model loaded with the same BitsAndBytesConfig, its vision tower, Q-Former and projection left unquantized as
    the stage leaves them (quantization is the LLM stage's alone), the output projection too (bitsandbytes' default)."""
    from transformers import BitsAndBytesConfig

    from tests.helpers import Reference

    skip = ["vision_model", "qformer", "language_projection", "lm_head"]
    config = (
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        if quantization == "int8"
        else BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=skip,
        )
    )
    vision, generator, _ = _run(checkpoints[llm], "fp32", {"quantization": quantization})
    pictures = [image_bytes(60 + i) for i in range(4)]
    embeds = vision.encode([vision.preprocess(check_image(data)) for data in pictures])
    request = GenerateRequest("q", None, "", GenerationParams(max_new_tokens=10))
    served = [list(generator.run([generator.prepare(request, e)])[0].token_ids) for e in embeds]
    reference = Reference(checkpoints[llm], quantization=config)
    assert type(reference.model.language_model.get_output_embeddings()).__name__ == "Linear"
    expected = [reference.generate([data], None, max_new_tokens=10)[0] for data in pictures]
    assert served == expected
    assert len({tuple(tokens) for tokens in expected}) > 1


def test_compiled_vision_pads_to_a_power_of_two_and_matches_eager(checkpoints):
    """`compile_vision`: three images run as one compiled batch of four (the last repeated), and each embedding is
    eager's within float32 rounding of fused kernels; off (the default), nothing is compiled."""
    config = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu")
    eager = VisionEncoder(config)
    assert eager.backend.compiled is None
    compiled = VisionEncoder(config.model_copy(update={"compile_vision": True}))
    shapes = []
    compiled.backend.compiled.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    pixels = [eager.preprocess(check_image(image_bytes(seed))) for seed in (1, 2, 3)]
    expected, got = eager.encode(pixels), compiled.encode(pixels)
    assert shapes and shapes[-1][0] == 4, shapes
    assert len(got) == 3
    for a, b in zip(got, expected):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
