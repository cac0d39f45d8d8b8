"""The settings the repository writer gives every Triton model, as one JSON parameter of its config.pbtxt."""

from __future__ import annotations

import json

from blip2_serve.clients.contract import (
    DEFAULT_MAX_NEW_TOKENS,
    LLM_MODEL,
    MAX_BATCH_SIZE,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_PROMPT_TOKENS,
    VISION_MODEL,
)
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.images import ImageLimits
from blip2_serve.deployments.types import GenerationParams
from pydantic import BaseModel, ConfigDict

SETTINGS_PARAMETER = "blip2_settings"  # the config.pbtxt parameter holding TritonSettings as JSON


class TritonSettings(BaseModel):
    """Everything a model of the repository needs, written by exporters/triton_repo.py."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig
    max_batch_size: int = MAX_BATCH_SIZE
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    vision_model: str = VISION_MODEL
    llm_model: str = LLM_MODEL

    @classmethod
    def from_args(cls, args: dict) -> TritonSettings:
        """From the `args` Triton passes to `initialize`."""
        parameters = json.loads(args["model_config"]).get("parameters", {})
        return cls.model_validate_json(parameters[SETTINGS_PARAMETER]["string_value"])

    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def defaults(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.default_max_new_tokens)
