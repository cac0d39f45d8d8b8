"""Typed settings the model deployments receive. The application config (serve/config.py) composes them."""

from __future__ import annotations

from typing import Literal

from blip2_serve.clients.contract import MAX_BATCH_SIZE
from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["auto", "fp32", "fp16", "bf16"]
Quantization = Literal["none", "int8", "int4"]
Device = Literal["auto", "cpu", "cuda"]
CpuLinear = Literal["auto", "onednn", "torch"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]


class ModelConfig(BaseModel):
    """Which checkpoint to load and how: a local directory or a hub name such as `Salesforce/blip2-opt-2.7b`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str
    revision: str | None = None
    dtype: Dtype = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    quantization: Quantization = "none"  # bitsandbytes, LLM stage only
    device: Device = "auto"  # auto: CUDA when the replica sees a GPU
    # Linear layers on CPU (fp32/bf16): "onednn" packs each weight once at load for oneDNN's GEMM, which is much
    # faster than PyTorch's default at the few rows of a decode step (16 rows x 2560 x 10240 here: 20 -> 6 ms), but
    # slower at a vision batch's thousands of rows; "torch" keeps PyTorch's own. "auto": oneDNN for the language
    # model's layers of 1M weights or more (smaller ones are faster unpacked): all of an OPT's, and of a Flan-T5 the
    # decoder's (less the cross-attention's keys and values), which compute decode tokens only; PyTorch's for every
    # vision stage and for a Flan-T5's encoder, whose different rounding changed greedy answers (bench: with every
    # T5 layer packed 14 of 16 captions equal to transformers' on the realistic T5; with its decode layers only, 48
    # of 48; every OPT answer equal). Under "auto" the packed layers keep their plain weights too, and 1-2 rows (a
    # lone request's decode step) go through PyTorch's linear where it measured the faster on this machine, at the
    # first request (loading.tune_once); that holds those weights once more in memory, so it is done only where that
    # is at most half the memory still available ("onednn" packs only). "torch" leaves every layer as it is.
    # deployments/loading.py.
    cpu_linear: CpuLinear = "auto"
    # Greedy tokens on CPU (continuous engine): from a screen of the output projection, each argmax proven against
    # the exact logits (deployments/head.py): "bf16" (oneDNN's bf16 GEMM, half the bytes of the biggest matmul of a
    # decode step; CPUs with AVX-512 bf16 or AMX) or "int8" (PyTorch's int8 weight-only GEMM, a quarter of them;
    # any x86 or Arm CPU); "off" from the full fp32 projection; "on": this CPU's screen (bf16 where it has it, else
    # int8); "auto": that, where the projection is big enough for the screen to pay (head.SCREEN_MIN_WEIGHTS: every
    # published BLIP-2, not the tiny test checkpoints).
    greedy_screen: Literal["auto", "on", "bf16", "int8", "off"] = "auto"
    # Attention kernels, passed to from_pretrained as `attn_implementation`: "auto" is transformers' choice (SDPA
    # where the model supports it), "flash_attention_2" needs the flash-attn package and a GPU. Measured on 2 CPU
    # cores, realistic OPT, one process, medians of 4 alternated runs: vision over 8 images 2.75 s SDPA / 3.22 s
    # eager, 1 image 0.39 / 0.38 s; 20 decode steps alone 1.52 / 1.55 s, at 16 rows 3.14 / 3.03 s (same tokens):
    # SDPA or even, so auto keeps it.
    attn_implementation: Attention = "auto"
    # On CUDA, whether PyTorch's scaled-dot-product attention may pick cuDNN's kernel (torch's default does). cuDNN
    # builds a plan for every new shape, and a decode step's key length is new at every step of a request whose
    # lengths were not seen before, so a request's first pass at new shapes pays for all of them. Measured on an
    # H200 (bench/sdpa_ab.py, bench/results/cudnn-attention-h200.md: full blip2-opt-2.7b shapes, fp16, one process
    # each way, same run): a lone caption's first call 4.68 s with cuDNN / 0.87 s without, five questions about one
    # image 4.73 / 0.62 s, 16 captions 1.51 / 0.43 s; transformers' own generate 1.22 / 0.25 s for one image. Warm
    # calls (the shapes seen): lone 0.25-0.51 / 0.22-0.35 s, 16 captions 0.35-0.58 / 0.27 s, but five questions
    # (prompts of different lengths, masked) 0.32-0.35 / 0.56-0.59 s: cuDNN's kernel wins there once its plans
    # exist. A server's shapes keep changing (each join and step), so off by default; the setting is process-wide
    # (deployments/loading.py sets it when a stage loads on CUDA).
    cudnn_attention: bool = False
    # torch.compile the vision half (tower + Q-Former + projection; inductor, static shapes): batches run padded to
    # the next power of two, so that at most log2(max batch) + 1 shapes are compiled, each on its first use. Off by
    # default: measured on 2 CPU cores (realistic OPT, one process, medians of 4 alternated runs) it gained nothing,
    # 8 images 3.87 s eager / 3.83 s compiled, 1 image 0.526 / 0.526 s, for 26 s and 17 s of compiling the first two
    # shapes, and its embeddings differ from eager by up to 3e-5 (fused kernels round differently). On a GPU,
    # `python -m bench.device_check --compile` measures both.
    compile_vision: bool = False
    # The continuous engine's running KV cache: "slab" keeps it in preallocated buffers (deployments/kvcache.py: a
    # step writes one column and a join writes its own rows, instead of copying the whole running cache as
    # transformers' DynamicCache concatenation does); "dynamic" is DynamicCache. "auto": slab. Measured on 2 CPU
    # cores, one process, 16 rows, 60 steps alternated: realistic OPT 88.7 -> 84.6 ms a step, medium 49.5 -> 47.2,
    # logits bitwise equal; bench.device_check times both on a GPU.
    kv_cache: Literal["auto", "slab", "dynamic"] = "auto"
    # torch.compile the continuous engine's decode step (inductor, dynamic shapes: the batch and the cache length
    # change from step to step). Inductor cannot compile oneDNN-packed layers or the greedy screen's bookkeeping, so
    # with it the language model keeps PyTorch's linear layers and the full output projection. Off by default:
    # measured on 2 CPU cores (realistic OPT, 16 rows, 30 steps alternated) a compiled step took 198 ms against 211
    # eager with PyTorch's layers, and 85-92 ms eager with the packed layers it gives up, after 18 s compiling; its
    # logits differ from eager's by ~1e-5. On a GPU (no packing there), `bench.device_check --compile` times it.
    compile_decode: bool = False
    local_files_only: bool = False  # never contact the hub (HF_HUB_OFFLINE=1 does the same)
    trust_remote_code: bool = False  # run Python shipped in a checkpoint: only when flagged (BLIP-2 needs none)

    @model_validator(mode="after")
    def _compilable(self) -> ModelConfig:
        if self.compile_decode and self.cpu_linear == "onednn":
            raise ValueError("compile_decode cannot compile oneDNN-packed layers: use cpu_linear auto or torch")
        return self


class BatchConfig(BaseModel):
    """Dynamic batching of one stage: at most `max_batch_size` requests, waiting up to `wait_timeout_s` for more.

    The default wait is 0, as Triton's default queue delay: a lone request runs at once, and under load the
    requests that arrive while a batch runs form the next one (measured in bench/: a 20 ms wait cost 20 ms at
    concurrency 1 and bought no throughput). The LLM stage's continuous scheduler batches by step, not here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1, le=256)
    wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0)


class VisionBackendConfig(BaseModel):
    """What runs the vision stage: transformers (`torch`) or an exported ONNX graph on ONNX Runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["torch", "onnxruntime"] = "torch"
    onnx_path: str | None = None  # the model.onnx `blip2-serve export onnx` wrote
    onnx_providers: tuple[str, ...] | None = None  # default: TensorRT/CUDA where a GPU is present, then CPU

    @model_validator(mode="after")
    def _needs_a_graph(self) -> VisionBackendConfig:
        if self.backend == "onnxruntime" and not self.onnx_path:
            raise ValueError("backend onnxruntime needs onnx_path")
        return self
