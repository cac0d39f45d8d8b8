"""The served model's contract: tensor names, datatypes, dims and generation parameters, defined once.

Used by the server (metadata, config, validation), the exporters and the clients. Pure Python: the SDK
imports it, so it must not import torch, ray or anything under serve/ or deployments/.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "blip2"
MODEL_VERSION = "1"
SERVER_NAME = "blip2-serve"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor. `dims` excludes the batch dimension, as in a Triton config."""

    name: str
    datatype: str  # KServe v2 datatype: "BYTES", "FP32", ...
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def triton_type(self) -> str:
        """The `data_type` a Triton model config uses for this datatype."""
        return "TYPE_STRING" if self.datatype == BYTES else f"TYPE_{self.datatype}"

    def metadata(self) -> dict:
        """The tensor in KServe v2 model metadata: its shape with the batch dimension (-1) first."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}

    def config(self, dims: tuple[int, ...] | list[int] | None = None) -> dict:
        """The tensor in a Triton model configuration (JSON form; config.pbtxt is the same message as text), with
        `dims` where a checkpoint makes the contract's -1s concrete."""
        tensor: dict = {
            "name": self.name,
            "data_type": self.triton_type,
            "dims": list(self.dims if dims is None else dims),
        }
        if self.optional:
            tensor["optional"] = True
        return tensor


# IMAGE: one encoded image file (PNG, JPEG, WebP, ...) per batch row; request shape [N, 1] (or [N]).
BYTES = "BYTES"  # KServe v2's datatype of every text and encoded-image tensor
IMAGE = TensorSpec("IMAGE", BYTES, (1,))
# PROMPT: UTF-8 text per row ([N, 1]), or one prompt for every row ([1, 1]); absent means captioning.
PROMPT = TensorSpec("PROMPT", BYTES, (1,), optional=True)
# TEXT: the generated text per row, without the prompt.
TEXT = TensorSpec("TEXT", BYTES, (1,))

INPUTS = (IMAGE, PROMPT)
OUTPUTS = (TEXT,)

# The model names of the stages: their metrics and statistics on the server, their models in the Triton repository.
VISION_MODEL = "blip2_vision"  # vision tower + Q-Former + language projection
LLM_MODEL = "blip2_llm"  # the language model
RETRIEVAL_STAGE_MODEL = "blip2_retrieval"  # the retrieval checkpoint's stage (its three models count at the server)

# Retrieval models (a BLIP-2 ITM checkpoint, `retrieval:` in the server config). Embeddings are L2-normalised
# (deployments/retrieval_model.py documents the pooling); the cosine of two is their dot product.
EMBED_IMAGE_MODEL = "blip2_embed_image"  # IMAGE [N, 1] -> EMBEDDING [N, D]
EMBED_TEXT_MODEL = "blip2_embed_text"  # TEXT [N, 1] -> EMBEDDING [N, D]
ITM_MODEL = "blip2_itm"  # IMAGE [N, 1], TEXT [N, 1] (pairs row by row) -> ITM_SCORE [N, 1], ITC_SCORE [N, 1]
TEXT_IN = TensorSpec("TEXT", BYTES, (1,))
EMBEDDING = TensorSpec("EMBEDDING", "FP32", (-1,))
ITM_SCORE = TensorSpec("ITM_SCORE", "FP32", (1,))  # the matching head's probability that the text fits the image
ITC_SCORE = TensorSpec("ITC_SCORE", "FP32", (1,))  # the contrastive similarity (max over query tokens of cosine)
RETRIEVAL_MODELS = {
    EMBED_IMAGE_MODEL: ((IMAGE,), (EMBEDDING,)),
    EMBED_TEXT_MODEL: ((TEXT_IN,), (EMBEDDING,)),
    ITM_MODEL: ((IMAGE, TEXT_IN), (ITM_SCORE, ITC_SCORE)),
}
RETRIEVAL_OUTPUTS = {spec.name: spec for _, outputs in RETRIEVAL_MODELS.values() for spec in outputs}

# The exported vision stage (vision tower + Q-Former + language projection).
PIXEL_VALUES = TensorSpec("pixel_values", "FP32", (3, -1, -1))
IMAGE_EMBEDS = TensorSpec("image_embeds", "FP32", (-1, -1))  # [num_query_tokens, llm_hidden]


@dataclass(frozen=True)
class ParamSpec:
    """A generation parameter sent as a request parameter; `minimum` is exclusive where `exclusive_min`."""

    name: str
    kind: type  # int, float, bool or str
    default: int | float | bool | str | None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False


GENERATION_PARAMETERS = (
    ParamSpec("max_new_tokens", int, 30, 1, 1024),
    ParamSpec("min_new_tokens", int, 0, 0, 1024),
    ParamSpec("num_beams", int, 1, 1, 16),
    ParamSpec("do_sample", bool, False),
    ParamSpec("temperature", float, 1.0, 0.0, 10.0, exclusive_min=True),
    ParamSpec("top_p", float, 1.0, 0.0, 1.0, exclusive_min=True),
    ParamSpec("top_k", int, 50, 0, 100_000),
    ParamSpec("repetition_penalty", float, 1.0, 0.0, 10.0, exclusive_min=True),
    ParamSpec("seed", int, None, 0, 2**63 - 1),
    # stop: a string (or, over OpenAI, up to MAX_STOP strings); generation ends before it, the text excludes it
    ParamSpec("stop", str, None, 1, 64),
)
MAX_STOP = 4
PARAMETERS_BY_NAME = {p.name: p for p in GENERATION_PARAMETERS}

# The server's defaults, defined once: the server config (serve/config.py), the stages, the Triton repository's
# settings (exporters/triton_settings.py) and the clients read them here.
DEFAULT_MAX_NEW_TOKENS = PARAMETERS_BY_NAME["max_new_tokens"].default  # a request that names no max_new_tokens
MAX_NEW_TOKENS_LIMIT = int(PARAMETERS_BY_NAME["max_new_tokens"].maximum)
MAX_NUM_BEAMS = int(PARAMETERS_BY_NAME["num_beams"].maximum)  # what any server may allow
DEFAULT_MAX_NUM_BEAMS = 8  # what a server allows unless configured (server.max_num_beams)
MAX_PROMPT_TOKENS = 512  # prompt tokens a request may send (the image's query tokens not counted)
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one encoded image file
MAX_IMAGE_PIXELS = 40_000_000  # one decoded image, width x height (decompression bombs)
MAX_IMAGES_PER_REQUEST = 8
MAX_BATCH_SIZE = 8  # rows per model execution where nothing else is said (a stage's batch, a Triton model's)
# The served vision and LLM stages' batch: 16 images per vision execution, 16 running sequences per decode step
# (a decode step reads every weight whatever the batch; bench/results/realistic-*.md measured 16 against 8).
STAGE_BATCH_SIZE = 16

# Request parameters that stock Triton clients may send and that are not generation parameters.
TRANSPORT_PARAMETERS = frozenset(
    {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers"}
)


def question_prompt(question: str) -> str:
    """The VQA prompt of the BLIP-2 model card: "Question: {question} Answer:"."""
    return f"Question: {question.strip()} Answer:"


def dialogue_prompt(turns: list[tuple[str, str]], question: str, system: str = "") -> str:
    """A conversation about one image as BLIP-2 (and LAVIS) prompt it: earlier (question, answer) turns, then
    the new question: "Question: q1 Answer: a1. Question: q2 Answer:". `system` text goes first, as it is."""
    parts = [system.strip()] if system.strip() else []
    for asked, answered in turns:
        answered = answered.strip()
        parts.append(
            f"Question: {asked.strip()} Answer: {answered if answered.endswith(('.', '!', '?')) else answered + '.'}"
        )
    parts.append(question_prompt(question))
    return " ".join(parts)
