"""Loading one half of a BLIP-2 checkpoint through transformers `from_pretrained`.

The vision stage loads only the vision tower, the query tokens, the Q-Former and the language projection;
the LLM stage loads only the language model. Both read the same checkpoint (a directory or a hub name)
that `Blip2ForConditionalGeneration.from_pretrained` reads, with the same dtype rules, and skip the other
half's weights, so a replica holds only what it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from blip2_serve.deployments.config import ModelConfig
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoProcessor, Blip2Processor
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
)

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Blip2VisionConnector(Blip2PreTrainedModel):
    """Vision tower + Q-Former + language projection: `pixel_values [B,3,H,W] -> image_embeds [B,Q,llm_hidden]`.

    Parameter names match Blip2ForConditionalGeneration, so its checkpoints load as they are.
    """

    main_input_name = "pixel_values"
    _keep_in_fp32_modules = ["query_tokens", "qformer"]
    _keys_to_ignore_on_load_unexpected = [r"^language_model\."]

    def __init__(self, config):
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The same steps, in the same dtypes, as the first half of `Blip2ForConditionalGeneration.generate`."""
        # image_features: [B, num_patches + 1, vision_hidden]
        image_features = self.vision_model(pixel_values, return_dict=True).last_hidden_state
        image_attention_mask = torch.ones(image_features.shape[:-1], dtype=torch.long, device=image_features.device)
        query_tokens = self.query_tokens.expand(image_features.shape[0], -1, -1)
        # query_output: [B, num_query_tokens, qformer_hidden]
        query_output = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_features,
            encoder_attention_mask=image_attention_mask,
            return_dict=True,
        ).last_hidden_state
        if query_output.dtype != image_features.dtype:  # the Q-Former may be kept in fp32
            query_output = query_output.to(image_features.dtype)
        return self.language_projection(query_output)  # [B, num_query_tokens, llm_hidden]


class Blip2LanguageModel(Blip2PreTrainedModel):
    """Only `language_model` (OPT decoder-only or Flan-T5 encoder-decoder) of a BLIP-2 checkpoint."""

    _keys_to_ignore_on_load_unexpected = [
        r"^vision_model\.",
        r"^qformer\.",
        r"^query_tokens",
        r"^language_projection\.",
    ]

    def __init__(self, config):
        super().__init__(config)
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        self.post_init()


def resolve_device(config: ModelConfig) -> torch.device:
    """CUDA when asked for, or when `auto` and this process sees a GPU; else CPU."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but this replica sees no GPU")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 on CPU for `auto`; half precision on CPU works but is slow, so it is logged."""
    if config.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = _DTYPES[config.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        logger.warning("dtype %s on CPU is much slower than fp32 on most CPUs", config.dtype)
    return dtype


def _from_pretrained(cls, config: ModelConfig, **kwargs):
    """`cls.from_pretrained(checkpoint)`: a local directory, or a hub name fetched (and cached) by transformers.

    Without transformers' progress bars below DEBUG: each replica's "Loading weights" bar reaches the console of
    `blip2-serve run` (the driver resolves and downloads a hub name once, with its own bar, serve/checkpoints.py).

    A model is loaded without the Hub's kernels unless `trust_remote_code`: transformers (5.21 on) replaces layers by
    kernels it fetches from the Hub by default (`use_kernels`), which is code from elsewhere, needs a network at load
    (without one, on the H200 of bench/results/device-check.md, a bitsandbytes load failed there) and computes
    other than what this project tests."""
    from transformers import PreTrainedModel
    from transformers.utils import logging as transformers_logging

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        transformers_logging.disable_progress_bar()
    if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        kwargs.setdefault("use_kernels", config.trust_remote_code)
    try:
        return cls.from_pretrained(
            config.checkpoint,
            revision=config.revision,
            local_files_only=config.local_files_only,
            trust_remote_code=config.trust_remote_code,
            **kwargs,
        )
    except OSError as exc:
        raise OSError(f"cannot load checkpoint {config.checkpoint!r} (a local directory or a hub name): {exc}") from exc


def load_processor(config: ModelConfig) -> Blip2Processor:
    """The checkpoint's processor; it must insert the image tokens (`num_query_tokens` set)."""
    processor = _from_pretrained(AutoProcessor, config)
    if getattr(processor, "num_query_tokens", None) is None:
        raise RuntimeError(
            f"the processor of {config.checkpoint} has no num_query_tokens: it would insert no image tokens"
        )
    return processor


def load_blip2_config(config: ModelConfig):
    """The checkpoint's Blip2Config (no weights)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, config)


# A PackedLinear that keeps its plain weight computes at most this many rows with PyTorch's linear (tune_plain_rows
# measures, per shape, up to which of them it is the faster).
PLAIN_MAX_ROWS = 2


class PackedLinear(nn.Module):
    """`nn.Linear` on CPU with its weight packed once into oneDNN's blocked layout (`weight` is that tensor).

    PyTorch's CPU linear calls a GEMM that repacks the weight on every call; at the few rows of a decode step that
    repacking costs more than the product (measured on 2 cores, 2560 -> 10240: 1 row 6.0 -> 4.6 ms, 16 rows
    20.4 -> 5.6 ms). At a vision batch's thousands of rows it does not pay: the realistic vision tower over 8 images
    took 3.21 s packed against 2.69 s with PyTorch's GEMM (medians of 6, alternated; 1 image 0.364 / 0.381 s), so
    `auto` packs the language model only. Results differ from PyTorch's by rounding only (about 1e-6 relative), as a
    different batch size already makes them differ.

    At one or two rows which one is faster depends on the machine. On one (2026-12-03, 2 cores, medians of 15, ms
    PyTorch's / packed) the packed GEMM was the slower: OPT's 2560 -> 2560 at 1 row 1.59 / 2.08, at 2 rows 1.71 /
    3.89, at 4 rows 2.89 / 2.49; 2560 -> 10240 7.90 / 9.32, 8.76 / 11.29, 17.80 / 10.72; 10240 -> 2560 7.74 / 9.66,
    8.08 / 10.68, 16.49 / 9.95 (the realistic OPT's lone caption in the engine 2.98 s packed only -> 2.19 s with
    PyTorch's at 1-2 rows). On another, an AVX2 EPYC, it was the faster: 2560 -> 10240 6.69 / 5.76, 14.2 / 5.37;
    10240 -> 2560 5.63 / 5.43, 10.89 / 5.90. So with `plain` kept (`keep_plain`: the unpacked weight beside the
    packed one, its memory once more) up to `plain_rows` rows go through PyTorch's linear on it, and their results
    are the ones transformers computes; tune_plain_rows sets `plain_rows` per shape from a measurement at the model's
    first use (tune_once; and lets the plain weight go where it wins at no row count).
    """

    def __init__(self, linear: nn.Linear, keep_plain: bool = False):
        super().__init__()
        self._pack(linear.weight, linear.bias)
        # fp32 only: PyTorch's bf16 linear at 1-2 rows is unmeasured
        plain = linear.weight.detach() if keep_plain and linear.weight.dtype == torch.float32 else None
        self.register_buffer("plain", plain, persistent=False)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
        """A PackedLinear of a bare weight [out, in] (fp32 or bf16) and bias."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._pack(weight, bias)
        module.register_buffer("plain", None, persistent=False)
        return module

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        self.register_buffer("bias", None if bias is None else bias.detach())

    # at most this many rows go through the plain weight (where kept); tune_plain_rows measures it per machine
    plain_rows = PLAIN_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None and x.numel() <= self.plain_rows * self.in_features:
            return nn.functional.linear(x, self.plain, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Under cpu_linear "auto", a linear layer with fewer weights than this keeps PyTorch's GEMM even where its half
# packs: a oneDNN call costs a fixed ~30 us more than PyTorch's at small sizes, which a small product does not win
# back (measured on 2 cores with the stages' passive OpenMP waiting, best of 3: 64 -> 64, 1 to 16 rows, 12 us
# PyTorch's / 40 us packed; 512 -> 2048, 1 row 132 / 204 us, 16 rows 708 / 339 us; 2560 -> 2560, 1 row 669 / 734,
# 4 rows 1284 / 732; 2560 -> 10240, 1 row 5640 / 4261; an earlier day's machine: on 2026-12-03 the 1-row figures
# favoured PyTorch's, see PackedLinear). Every layer of a published BLIP-2's language model is over
# it; the tiny test checkpoints' are all under it, and packing them made a lone tiny caption served 78 ms instead of
# 60 (p50, blip2-serve run, alternated).
PACK_MIN_WEIGHTS = 1 << 20


def _replace_linear_layers(
    model: nn.Module, wanted: Callable[[nn.Module, nn.Linear], bool], make: Callable[[nn.Linear], nn.Module]
) -> int:
    """Replace every plain `nn.Linear` (not a subclass: quantized layers stay) for which `wanted(parent, layer)`
    by `make(layer)`; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and wanted(parent, child):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def small_model(model: nn.Module) -> bool:
    """Whether every linear layer of `model` (plain or packed) has fewer than PACK_MIN_WEIGHTS weights: a model whose
    steps are too small to split across cores (the LLM and vision stages compute such a model on one thread)."""
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    return bool(sizes) and max(sizes) < PACK_MIN_WEIGHTS


def stage_threads(model: nn.Module | None, torch_threads: int | None) -> int | None:
    """A model stage's torch threads: `torch_threads` where given, else 1 for a `small_model` (as small as the test
    checkpoints: its ops are too small to split, and waking a second OpenMP thread for each costs more than it saves;
    in one process the tiny OPT's 20 tokens took 20.3 ms on 2 threads and 16.7 ms on 1, one tiny image 5.3 and 2.2 ms,
    medians of 60), else None: the stage's default (every core where it takes turns). `model` None: a backend that
    sets its own threads (ONNX Runtime's)."""
    if torch_threads is None and model is not None and small_model(model):
        return 1
    return torch_threads


def _packs(weight: torch.Tensor, config: ModelConfig) -> bool:
    """Whether a layer with `weight` (in a half that packs) is packed: any size under "onednn", big ones under auto."""
    return config.cpu_linear == "onednn" or weight.numel() >= PACK_MIN_WEIGHTS


def packs_linear_layers(config: ModelConfig, blip2_config, device: torch.device, half: str) -> bool:
    """Whether linear layers of a CPU model's `half` ("vision" or "language") become PackedLinear: `cpu_linear`
    "onednn" (both halves, every layer), or "auto" for the language model (an OPT's layers of at least
    PACK_MIN_WEIGHTS weights, `_packs`; a Flan-T5's decode layers only, `decode_layers`). The vision half keeps
    PyTorch's GEMM under "auto": packing was slower at its row counts (PackedLinear), and unpacked its embeddings
    are the ones transformers computes."""
    if device.type != "cpu" or config.cpu_linear == "torch" or not torch.backends.mkldnn.is_available():
        return False
    if config.cpu_linear == "onednn":
        return True
    if half == "language" and config.compile_decode:  # inductor cannot compile packed layers
        return False
    return half == "language"


def decode_layers(language_model: nn.Module) -> set[int]:
    """The ids of an encoder-decoder (Flan-T5) language model's linear layers that compute decode tokens only: its
    decoder's, less the cross-attention's keys and values (which read the encoder's states, as the encoder reads
    the prompt: a prefill's rows).

    Under cpu_linear "auto" these are packed and the others keep PyTorch's GEMM. A decode step has as many rows as
    sequences running, where MKL's SGEMM is slow (measured on an AVX2 EPYC, 2 cores, medians of 15, ms PyTorch's /
    packed, 4 and 16 rows: 2048 -> 5120 6.49 / 1.96, 7.52 / 3.49; 5120 -> 2048 5.90 / 2.19, 7.24 / 4.43; 2048 ->
    2048 2.30 / 1.02, 2.72 / 1.77), and Flan-T5's greedy answers keep transformers' there: the realistic and medium
    T5 checkpoints' 48 captions and 5 questions each, all equal with decode layers packed; with every layer packed
    (cpu_linear "onednn") 2 of the realistic one's 48 captions changed. The encoder, which every decode step reads
    through the cross-attention, keeps the rounding transformers gives it."""
    decoder = language_model.get_decoder()
    prefill = {
        id(getattr(module.EncDecAttention, name))
        for module in decoder.modules()
        if hasattr(module, "EncDecAttention")
        for name in ("k", "v")
    }
    return {id(m) for m in decoder.modules() if isinstance(m, nn.Linear) and id(m) not in prefill}


def pack_linear_layers(model: nn.Module, config: ModelConfig, device: torch.device, half: str) -> nn.Module:
    """Every plain `nn.Linear` of a CPU model's `half` in fp32/bf16 as a PackedLinear where packs_linear_layers says
    (under "auto", those of PACK_MIN_WEIGHTS weights or more).

    Quantized layers (subclasses of nn.Linear) stay as they are; of a Flan-T5 under "auto", only its decode layers
    (decode_layers) are packed. The language model's output projection becomes a GreedyHead (deployments/head.py)
    holding a packed copy and a screen's beside the plain weight it shares with the embedding: that matrix is held
    2.25-2.5 times (1.3 GB for OPT-2.7B). Beside a Flan-T5's unpacked encoder, the packed copy's argmax is proven
    too (GreedyHead's `prove_packed`), so that its greedy tokens are the exact logits' at every row count.
    """
    if not packs_linear_layers(config, model.config, device, half):
        return model
    from blip2_serve.deployments.head import GreedyHead, wanted_screen

    language_model = getattr(model, "language_model", None)
    only: set[int] | None = None  # the layers packed, where not every one (a Flan-T5's decode layers under auto)
    if language_model is not None and config.cpu_linear == "auto" and not model.config.use_decoder_only_language_model:
        only = decode_layers(language_model)
    kind = None if language_model is None else wanted_screen(config.greedy_screen, language_model)
    if kind is not None:
        head = language_model.get_output_embeddings()
        # packed where worth it, the screen beside; the plain weight it holds anyway serves 1-2 rows under "auto";
        # where the other layers keep PyTorch's rounding somewhere (only), the packed logits' argmax is proven too
        GreedyHead.install(
            language_model,
            packed=_packs(head.weight, config),
            keep_plain=config.cpu_linear == "auto",
            kind=kind,
            prove_packed=only is not None,
        )

    def wanted(parent: nn.Module, child: nn.Linear) -> bool:
        return (
            type(parent).__name__ != "GreedyHead"  # it keeps the plain weight for its exact recount
            and child.weight.dtype in (torch.float32, torch.bfloat16)
            and _packs(child.weight, config)
            and (only is None or id(child) in only)
        )

    # what the fp32 layers' plain weights hold (PackedLinear keeps no other)
    plain_bytes = sum(
        child.weight.numel() * child.weight.element_size()
        for parent in model.modules()
        for child in parent.children()
        if type(child) is nn.Linear and wanted(parent, child) and child.weight.dtype == torch.float32
    )
    keep_plain = keeps_plain_weights(config, half, plain_bytes)
    replaced = _replace_linear_layers(model, wanted, lambda linear: PackedLinear(linear, keep_plain=keep_plain))
    logger.info("%d linear layers packed for oneDNN", replaced)
    if keep_plain:  # timed at the model's first use (tune_once); until then PLAIN_MAX_ROWS rows go the plain way
        model.plain_rows_pending = True
    return model


def tune_once(model: nn.Module) -> None:
    """`tune_plain_rows` on a model from `pack_linear_layers`, the first time it is called; the caller holds its turn
    at the node's cores. Not at load: the stages of a node load together (`blip2-serve run` starts them at once),
    and a GEMM on two threads timed while another process computes on one of the cores runs as if on one, while
    PyTorch's linear at 1-2 rows runs on one thread anyway, so the plain weights win where they lose in a quiet
    process. Measured on 2 cores (an AVX2 EPYC), the realistic Flan-T5: timed in one process the packed GEMM won on
    every shape; in the LLM replica, timed beside the vision stage's loading, PyTorch's linear kept 1-2 rows, and a
    lone caption's 20 tokens ran on about one thread (its engine thread 1.4 CPU-s, the second 0.7)."""
    if not getattr(model, "plain_rows_pending", False):
        return
    model.plain_rows_pending = False
    choices = tune_plain_rows(model)
    logger.info(
        "plain weights kept for the rows where PyTorch's linear was the faster here (0: let go): %s",
        ", ".join(f"{shape[1]} -> {shape[0]}: {rows}" for shape, rows in choices.items()),
    )


def measure_linear(module: PackedLinear, rows: int, repeats: int = 7) -> tuple[float, float]:
    """(PyTorch's linear on the plain weight, oneDNN's packed GEMM) on `rows` rows of `module`: medians in ms of
    calls taken in turns."""
    import statistics
    import time

    x = torch.randn(rows, module.in_features, dtype=module.plain.dtype)
    calls = (
        lambda: nn.functional.linear(x, module.plain, module.bias),
        lambda: torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, "none", [], ""),
    )
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for call in calls:  # first calls allocate
            call()
        for _ in range(repeats):
            for call, taken in zip(calls, times):
                started = time.perf_counter()
                call()
                taken.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


# PyTorch's linear keeps a row count where it is at least this much faster than the packed GEMM (the plain weight
# is memory held once more: a tie goes to freeing it)
PLAIN_MARGIN = 0.95


def tune_plain_rows(model: nn.Module, measure: Callable[[PackedLinear, int], tuple[float, float]] | None = None):
    """Measure, on this machine, which of PyTorch's linear and the packed GEMM is faster at 1 and 2 rows for each
    shape of `model`'s PackedLinears that keep a plain weight, and set each one's `plain_rows` to the rows up to
    which the plain one wins (by PLAIN_MARGIN); where it wins at none, the plain weight is let go. Which is faster
    depends on the CPU: on 2 cores of one machine the plain one won at 1-2 rows of every OPT shape (2560 -> 10240,
    1 row 7.90 / 9.32 ms, 2 rows 8.76 / 11.29), on another, an AVX2 EPYC, the packed one did (6.69 / 5.76, 14.2 /
    5.37), so no fixed rule is right for both. Returns {(out, in): rows}. Takes about half a second for OPT's four
    shapes."""
    layers: dict[tuple[int, int], list[PackedLinear]] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.plain is not None:
            layers.setdefault((module.out_features, module.in_features), []).append(module)
    measure = measure or measure_linear
    choices = {}
    for shape, modules in layers.items():
        rows = 0
        for candidate in range(1, PLAIN_MAX_ROWS + 1):
            plain_ms, packed_ms = measure(modules[0], candidate)
            if plain_ms > PLAIN_MARGIN * packed_ms:
                break
            rows = candidate
        choices[shape] = rows
        for module in modules:
            module.plain_rows = rows
            if rows == 0:
                module.plain = None
    return choices


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process could still allocate: the machine's MemAvailable (psutil's figure where /proc/meminfo is
    missing), capped by a cgroup v2 memory limit (a Kubernetes memory limit) less the cgroup's working set (its usage
    less its inactive file cache, which the kernel reclaims first, as the kubelet counts it); None where nothing can
    be read."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except Exception:  # no psutil, or it cannot read this platform
            pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            try:
                stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
                used -= int(stat.get("inactive_file", 0))
            except (OSError, ValueError):
                pass
            room = int(limit) - max(0, used)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def keeps_plain_weights(config: ModelConfig, half: str, plain_bytes: int) -> bool:
    """Whether the packed layers of a model's `half` keep their plain weights for 1-PLAIN_MAX_ROWS rows
    (PackedLinear): under cpu_linear "auto", for the language model (whose decode steps have that few rows), where
    the memory they hold, `plain_bytes`, is at most half of what is still available; "onednn" packs only."""
    if config.cpu_linear != "auto" or half != "language":
        return False
    available = available_memory()
    if available is not None and plain_bytes > available / 2:
        logger.warning(
            "linear layers packed only: keeping their plain weights for lone requests' decode steps would hold %.1f "
            "GiB more, over half of the %.1f GiB available",
            plain_bytes / 2**30,
            available / 2**30,
        )
        return False
    return True


def _attention(config: ModelConfig) -> dict:
    """from_pretrained's `attn_implementation`, where the config names one (else transformers' default)."""
    return {} if config.attn_implementation == "auto" else {"attn_implementation": config.attn_implementation}


def cuda_attention_backends(config: ModelConfig, device: torch.device) -> None:
    """On CUDA, let scaled-dot-product attention use cuDNN's kernel only where `cudnn_attention` says (a process-wide
    switch of PyTorch's; ModelConfig.cudnn_attention has the measurements). Elsewhere nothing changes."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(config.cudnn_attention)


def load_vision(config: ModelConfig) -> tuple[Blip2VisionConnector, torch.device, torch.dtype]:
    """The vision half on its device, in eval mode (its linear layers packed on CPU only with cpu_linear onednn)."""
    device = resolve_device(config)
    cuda_attention_backends(config, device)
    dtype = resolve_dtype(config, device)
    model = _from_pretrained(Blip2VisionConnector, config, dtype=dtype, **_attention(config))
    return pack_linear_layers(model.to(device).eval(), config, device, "vision"), device, dtype


def _quantization_config(config: ModelConfig, dtype: torch.dtype):
    if config.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401  (fail here, with the fix, rather than deep in from_pretrained)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise RuntimeError(
            f"quantization {config.quantization} needs bitsandbytes: pip install 'blip2-serve[quant]'"
        ) from exc
    if config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_language_model(config: ModelConfig) -> tuple[Blip2LanguageModel, torch.device, torch.dtype]:
    """The LLM half on its device, in eval mode, quantized by bitsandbytes when configured, its linear layers packed
    on CPU (pack_linear_layers)."""
    device = resolve_device(config)
    cuda_attention_backends(config, device)
    dtype = resolve_dtype(config, device)
    quantization = _quantization_config(config, dtype)
    kwargs = _attention(config)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": str(device)})
    model = _from_pretrained(Blip2LanguageModel, config, dtype=dtype, **kwargs)
    if quantization is None:
        model = model.to(device)
    model = model.eval()
    if packs_linear_layers(config, model.config, device, "language"):
        model = pack_linear_layers(model, config, device, "language")
    return model, device, dtype
