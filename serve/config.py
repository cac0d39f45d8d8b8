"""The application's one typed configuration: model, stages (replicas, autoscaling, batching, resources), server.

Flows one way: YAML/JSON or CLI flags -> AppConfig -> build_app(config) -> .bind(). Nothing reads argv here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from blip2_serve.clients.contract import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_NUM_BEAMS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES_PER_REQUEST,
    MAX_NEW_TOKENS_LIMIT,
    MAX_NUM_BEAMS,
    MAX_PROMPT_TOKENS,
    MODEL_NAME,
    STAGE_BATCH_SIZE,
)
from blip2_serve.deployments.config import BatchConfig, ModelConfig, VisionBackendConfig
from blip2_serve.deployments.images import ImageLimits
from blip2_serve.deployments.types import GenerationLimits, GenerationParams
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Each replica runs its methods on the event loop that receives its requests (one of Ray Serve's throughput-optimised
# settings; by default a replica's methods run on a loop of their own, on another thread: a thread hop in and out of
# every call). It changes only the replicas: handles in any process route as before (the router setting of the same
# family would break every synchronous handle call made outside an event loop, such as `blip2-serve run`'s drain at
# Ctrl-C). Measured on 2 cores, lone tiny captions alternated between two applications of one Ray, one with this
# setting (2026-12-03, 6 rounds of 60): the p50 1.6-8.7 ms lower and the mean 1-6 ms lower in every round, the CPU per
# request lower in 5 of 6. The model stages compute off their event loops (threads of their own) either way. It is in
# the runtime_env of every replica a request passes through, the ingress's and the model stages'
# (AppConfig.replica_env), so that a Ray cluster, KubeRay and a Serve config file get it as `blip2-serve run` does; a
# stage's own `env` wins. (The drain coordinator and the Batch API's replica get it only from the embedded Ray.)
REQUEST_PATH_ENVIRONMENT = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling of one stage, by ongoing requests per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)  # how often replicas and handles report their load
    look_back_period_s: float = Field(30.0, gt=0)  # the window the load is averaged over

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class StageConfig(BaseModel):
    """Replicas, resources and batching of one deployment. `autoscaling` replaces `num_replicas` when set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: 2 x max_batch_size
    max_queued_requests: int = Field(1024, ge=-1)  # beyond this a caller gets 503; -1: unbounded
    # auto: 1 for a replica with a GPU; on CPU, where the stages take turns at all of the node's cores (cpu_turns),
    # half a logical CPU each, so that vision + LLM + retrieval fit on 2 cores (their compute is shared in turns
    # whatever Ray counts); 1 otherwise
    num_cpus: float | Literal["auto"] = "auto"
    num_gpus: float | Literal["auto"] = "auto"  # auto: 1 where the cluster has GPUs and the model may use one
    resources: dict[str, float] = {}  # Ray custom resources, to place the stage on labelled nodes (multi-node, KubeRay)
    torch_threads: int | None = Field(None, ge=1)
    batch: BatchConfig = BatchConfig()
    # environment variables of this stage's replica processes (Ray runtime_env), over the server's own
    # (e.g. HF_HOME, a library's settings, BLIP2_SERVE_INJECT_FAULT for failure drills: deployments/faults.py)
    env: dict[str, str] = {}

    def cpus_for(self, num_gpus: float, cpu_turns: bool = True) -> float:
        """Logical CPUs per replica (see num_cpus) for a replica with `num_gpus` GPUs."""
        if self.num_cpus != "auto":
            return float(self.num_cpus)
        return 0.5 if num_gpus == 0 and cpu_turns else 1.0

    @property
    def initial_replicas(self) -> int:
        """Replicas at start: num_replicas, or the autoscaling minimum (at least one)."""
        return self.num_replicas if self.autoscaling is None else max(1, self.autoscaling.min_replicas)

    def deployment_options(
        self, num_gpus: float, env_vars: dict[str, str] | None = None, cpu_turns: bool = True
    ) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options()`; `env_vars` go to the replicas' processes (runtime_env)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or 2 * self.batch.max_batch_size,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.cpus_for(num_gpus, cpu_turns), "num_gpus": num_gpus},
        }
        if self.resources:
            options["ray_actor_options"]["resources"] = dict(self.resources)
        env_vars = {**(env_vars or {}), **self.env}
        if env_vars:
            options["ray_actor_options"]["runtime_env"] = {"env_vars": env_vars}
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas
        return options

    @model_validator(mode="after")
    def _room_for_a_batch(self) -> StageConfig:
        # Ray caps a replica's in-flight calls at max_ongoing_requests, so a smaller value caps every batch.
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.batch.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least batch.max_batch_size")
        return self


class LLMStageConfig(StageConfig):
    """The LLM stage: a StageConfig and its scheduler. `continuous`: requests join and leave the running decode batch
    between steps (beam search runs as whole batches); `static`: whole dynamic batches through `generate`."""

    scheduler: Literal["continuous", "static"] = "continuous"
    # STAGE_BATCH_SIZE running sequences: a decode step reads every weight whatever the batch, so one step over 16
    # sequences costs far less than 16 over one; 16 concurrent captions take ~20 steps, not ~40.
    batch: BatchConfig = BatchConfig(max_batch_size=STAGE_BATCH_SIZE)


class RetrievalStageConfig(StageConfig):
    """The optional retrieval stage (blip2_embed_image, blip2_embed_text, blip2_itm, /v1/embeddings): a BLIP-2
    image-text retrieval checkpoint (e.g. `Salesforce/blip2-itm-vit-g`) with its own replicas and batching."""

    model: ModelConfig


class ServerConfig(BaseModel):
    """The HTTP edge: address, public model name, request limits and default generation parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(8001, ge=0, le=65535)  # None: no gRPC
    image_url_allowlist: tuple[str, ...] = ()  # URL prefixes the OpenAI route may fetch images from
    api_key_env: str | None = None  # environment variable with the API key; set: every route but health needs it
    retry_after_s: int = Field(1, ge=0)  # the Retry-After of 503 answers (overload, a replica lost)
    drain_timeout_s: float = Field(30.0, ge=0)  # on SIGTERM: how long in-flight requests may take to finish
    model_name: str = MODEL_NAME
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(MAX_IMAGES_PER_REQUEST, ge=1, le=1024)
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1)
    max_prompt_tokens: int = Field(MAX_PROMPT_TOKENS, ge=1)
    default_max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    max_new_tokens_limit: int = Field(
        MAX_NEW_TOKENS_LIMIT, ge=1, le=MAX_NEW_TOKENS_LIMIT
    )  # the most a request may ask for
    # beam search costs num_beams sequences of LLM work
    max_num_beams: int = Field(DEFAULT_MAX_NUM_BEAMS, ge=1, le=MAX_NUM_BEAMS)
    # OpenAI's Batch API (/v1/files, /v1/batches; serve/batch_jobs.py), off unless set: uploaded files, batches and
    # their results live under <batch_dir>/<app_name>-<http_port> (AppConfig.batch_location); a local path such as
    # ~/.cache/blip2-serve/batches, or a pyarrow URI such as s3://bucket/prefix on a cluster, where the Batches
    # replica may restart on another node. Created on first use.
    batch_dir: str | None = None
    batch_concurrency: int = Field(4, ge=1, le=256)  # Batch API lines in flight at once, over all batches
    batch_max_requests: int = Field(50_000, ge=1)  # lines in one batch's input file (OpenAI's limit)
    batch_max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024)  # one uploaded file (OpenAI's limit)

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServerConfig:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens_limit")
        if self.grpc_port and self.grpc_port == self.http_port:  # both proxies bind with SO_REUSEPORT: no error
            raise ValueError(f"http_port and grpc_port are both {self.http_port}: give them different ports")
        return self

    def generation_limits(self) -> GenerationLimits:
        return GenerationLimits(self.max_new_tokens_limit, self.max_num_beams)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def default_params(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.default_max_new_tokens)


class EmbeddingCacheConfig(BaseModel):
    """The vision stage's image-embedding cache, per replica; 0 bytes turns it off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(256 * 1024 * 1024, ge=0)


def _ingress_default() -> StageConfig:
    return StageConfig(num_cpus=0.0, num_gpus=0, max_ongoing_requests=256)


class AppConfig(BaseModel):
    """Everything `build_app` needs. Load from YAML/JSON with `AppConfig.from_file`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig
    server: ServerConfig = ServerConfig()
    ingress: StageConfig = Field(default_factory=_ingress_default)
    # STAGE_BATCH_SIZE images a batch, as the LLM stage's sequences: what arrived while the tower was busy runs together
    vision: StageConfig = StageConfig(batch=BatchConfig(max_batch_size=STAGE_BATCH_SIZE))
    vision_backend: VisionBackendConfig = VisionBackendConfig()
    embedding_cache: EmbeddingCacheConfig = EmbeddingCacheConfig()
    llm: LLMStageConfig = LLMStageConfig()
    retrieval: RetrievalStageConfig | None = None
    # CPU stages on one node compute with all of its cores and take turns at them (deployments/cores.py): the stage
    # with work gets the whole machine. false: each stage computes whenever it likes on its torch_threads (default:
    # Ray's num_cpus) threads.
    cpu_turns: bool = True
    app_name: str = "blip2"
    route_prefix: str = "/"

    def batch_location(self) -> str | None:
        """Where this server keeps its Batch API state: one folder per application and port under
        server.batch_dir, so that two servers on one machine never take up each other's batches (each Batches
        replica runs every unfinished batch it finds), and the same server started again finds its own."""
        root = self.server.batch_dir
        return None if root is None else f"{root.rstrip('/')}/{self.app_name}-{self.server.http_port}"

    def replica_env(self, model_stage: bool) -> dict[str, str]:
        """Environment variables of a replica's process (its runtime_env, under the stage's own `env`): the request
        path's (the ingress and every model stage), and those of a model stage that takes turns at the cores."""
        from blip2_serve.deployments.cores import TURN_ENVIRONMENT

        env = dict(REQUEST_PATH_ENVIRONMENT)
        if model_stage and self.cpu_turns:
            env.update(TURN_ENVIRONMENT)
        return env

    @staticmethod
    def read_document(path: str | Path) -> Any:
        """The parsed YAML (.yaml/.yml) or JSON file."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)

    @classmethod
    def from_file(cls, path: str | Path) -> AppConfig:
        """Read an AppConfig, or the blip2 application's AppConfig from a Ray Serve config file."""
        from blip2_serve.serve.deploy_config import app_config_of, is_serve_config

        document = cls.read_document(path)
        return app_config_of(document) if is_serve_config(document) else cls.model_validate(document)
