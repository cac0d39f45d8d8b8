"""The tiny checkpoint factory and the split loaders, through `from_pretrained` only."""

from __future__ import annotations

import json

import pytest
import torch
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.loading import Blip2LanguageModel, Blip2VisionConnector, load_processor

from tests.helpers import image_bytes


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_tiny_checkpoint_is_a_real_blip2_checkpoint(checkpoints, references, llm):
    path = checkpoints[llm]
    assert (path / "model.safetensors").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    processor = references[llm].processor
    assert processor.num_query_tokens == config["num_query_tokens"]
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"]
    # Different images give different captions (the default init would give one caption for all).
    reference = references[llm]
    captions = [tuple(reference.generate([image_bytes(i)], None, max_new_tokens=8)[0]) for i in range(6)]
    assert len(set(captions)) >= 5, captions


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_split_loaders_hold_exactly_their_half(checkpoints, references, llm):
    full = references[llm].model.state_dict()
    vision = Blip2VisionConnector.from_pretrained(checkpoints[llm]).state_dict()
    language = Blip2LanguageModel.from_pretrained(checkpoints[llm]).state_dict()
    assert vision.keys() | language.keys() == full.keys()
    assert not any(k.startswith("language_model.") for k in vision)
    assert all(k.startswith("language_model.") for k in language)
    for name, tensor in {**vision, **language}.items():
        assert torch.equal(tensor, full[name]), name


def test_hub_names_go_through_the_same_loader():
    """With no hub here, a hub name fails inside transformers' hub lookup; the error names the checkpoint."""
    with pytest.raises(OSError, match="'Salesforce/blip2-opt-2.7b'.*huggingface.co"):
        load_processor(ModelConfig(checkpoint="Salesforce/blip2-opt-2.7b", local_files_only=True))


def test_processor_without_num_query_tokens_is_refused(checkpoints, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints["opt"], copy)
    config_file = copy / "processor_config.json"
    config = json.loads(config_file.read_text())
    config.pop("num_query_tokens")
    config_file.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="num_query_tokens"):
        load_processor(ModelConfig(checkpoint=str(copy)))


def test_cpu_linear_layers_are_packed_for_onednn_where_the_answers_stay_equal(checkpoints):
    """cpu_linear "auto" (default): every plain Linear of an OPT checkpoint's language model with PACK_MIN_WEIGHTS
    weights or more becomes a PackedLinear, whose output equals nn.Linear's to rounding, the smaller ones stay
    PyTorch's; its vision half keeps PyTorch's (packing was slower at a vision batch's rows); a T5 checkpoint packs its
    decode layers only (test_a_t5_packs_its_decode_layers_only), unless "onednn" is asked, which packs both halves
    whatever their size; "torch" never packs. (The tiny checkpoint's layers are all under the real threshold, so
    the threshold is lowered here to split them: 64 x 64 attention projections under it, the rest over.)"""
    import torch
    from blip2_serve.deployments import loading
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.head import GreedyHead
    from blip2_serve.deployments.loading import PackedLinear, load_language_model, load_vision
    from torch import nn

    def auto_layers(threshold: int) -> dict[str, type]:
        """The tiny OPT language model's linear layers by name under "auto" (screen off) with this threshold."""
        settings = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", greedy_screen="off")
        saved, loading.PACK_MIN_WEIGHTS = loading.PACK_MIN_WEIGHTS, threshold
        try:
            model = load_language_model(settings)[0]
        finally:
            loading.PACK_MIN_WEIGHTS = saved
        return {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))}

    real = auto_layers(loading.PACK_MIN_WEIGHTS)
    assert real and set(real.values()) == {nn.Linear}  # every tiny layer is under 1M weights
    split = auto_layers(64 * 64 + 1)
    small = {name for name in split if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))}
    assert small and {split[name] for name in small} == {nn.Linear}
    assert set(split) - small and {split[name] for name in set(split) - small} == {PackedLinear}

    def kinds(llm: str, cpu_linear: str, load) -> set[type]:
        """The module types of one half; a GreedyHead's own modules left out: its plain weight (kept for its exact
        recount) and, where oneDNN has bf16, its bf16 screen (a PackedLinear of the bf16 weights, whatever
        cpu_linear says: the screen's kernel, not a layer of the model)."""
        settings = ModelConfig(
            checkpoint=str(checkpoints[llm]), device="cpu", cpu_linear=cpu_linear, greedy_screen="on"
        )
        model = load(settings)[0]
        heads = [m for m in model.modules() if isinstance(m, GreedyHead)]
        inner = {id(m) for head in heads for m in head.modules() if m is not head}
        return {type(m) for m in model.modules() if id(m) not in inner}

    opt = kinds("opt", "onednn", load_language_model)  # the output projection: a GreedyHead, packed, with its screen
    assert PackedLinear in opt and GreedyHead in opt and nn.Linear not in opt
    assert nn.Linear in kinds("opt", "auto", load_vision) and PackedLinear not in kinds("opt", "auto", load_vision)
    for load in (load_vision, load_language_model):
        assert PackedLinear not in kinds("t5", "auto", load) and PackedLinear in kinds("t5", "onednn", load)
        assert PackedLinear in kinds("opt", "onednn", load) and PackedLinear not in kinds("opt", "torch", load)
    linear = nn.Linear(24, 40)
    packed_layer = PackedLinear(linear)
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(packed_layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_packed_layers_keep_their_plain_weights_for_one_or_two_rows(checkpoints):
    """Under cpu_linear "auto" the language model's packed layers keep their plain weights, and a decode step of 1 or
    2 rows (a lone request's) goes through PyTorch's linear on them: bitwise nn.Linear's result, which the packed GEMM
    is not; from 3 rows on the packed GEMM computes. "onednn" packs only, and so does "auto" where the plain weights
    would hold over half of the memory still available (available_memory reads MemAvailable and a cgroup limit)."""
    import torch
    from blip2_serve.deployments import loading
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.loading import (
        PLAIN_MAX_ROWS,
        PackedLinear,
        available_memory,
        keeps_plain_weights,
        load_language_model,
    )
    from torch import nn

    torch.manual_seed(0)
    linear = nn.Linear(512, 384)
    kept, packed_only = PackedLinear(linear, keep_plain=True), PackedLinear(linear)

    def onednn_ran(layer, x) -> bool:
        """Whether `layer(x)` called oneDNN's packed GEMM (the profiler's record of the ops that ran)."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            layer(x)
        return any(event.name == "mkldnn::_linear_pointwise" for event in profile.events())

    with torch.inference_mode():
        for rows in range(1, PLAIN_MAX_ROWS + 1):
            x = torch.randn(rows, 1, 512)
            assert torch.equal(kept(x), linear(x)) and not onednn_ran(kept, x)
            assert onednn_ran(packed_only, x)
        x = torch.randn(PLAIN_MAX_ROWS + 1, 512)
        assert onednn_ran(kept, x) and torch.equal(kept(x), packed_only(x))

    def plain_kept(cpu_linear: str, plain_ms: float = 1.0) -> set[bool]:
        """Whether the packed layers keep plain weights, PyTorch's linear timed at `plain_ms` against 2 ms packed."""
        settings = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", cpu_linear=cpu_linear)
        saved = loading.PACK_MIN_WEIGHTS, loading.measure_linear
        loading.PACK_MIN_WEIGHTS = 1  # the tiny layers all pack
        loading.measure_linear = lambda module, rows: (plain_ms, 2.0)  # what this machine's timing would say
        try:
            model = load_language_model(settings)[0]
            assert {m.plain is not None for m in model.modules() if type(m) is PackedLinear} <= {cpu_linear == "auto"}
            loading.tune_once(model)  # at the model's first use (the engine's first iteration), not at load
            loading.measure_linear = lambda module, rows: (0.1, 2.0)  # once only: a second call measures nothing
            loading.tune_once(model)
        finally:
            loading.PACK_MIN_WEIGHTS, loading.measure_linear = saved
        return {m.plain is not None for m in model.modules() if type(m) is PackedLinear}

    assert plain_kept("auto") == {True} and plain_kept("onednn") == {False}
    assert plain_kept("auto", plain_ms=3.0) == {False}  # where the packed GEMM is the faster, the plain ones go
    assert available_memory() is not None  # so that the memory rule below is the one deciding
    auto = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu")
    assert keeps_plain_weights(auto, "language", 1 << 20)
    assert not keeps_plain_weights(auto, "language", 1 << 60)  # more than any machine has
    assert not keeps_plain_weights(auto, "vision", 1 << 20)


def test_plain_rows_are_measured_per_shape_on_the_machine():
    """tune_plain_rows: each shape of packed layer keeps its plain weight for the rows (1-2) where PyTorch's linear
    was the faster by the margin, in order; none, and the plain weight is let go. The real measurement times both."""
    import torch
    from blip2_serve.deployments.loading import PackedLinear, measure_linear, tune_plain_rows
    from torch import nn

    model = nn.Sequential(*(PackedLinear(nn.Linear(i, o), keep_plain=True) for i, o in [(64, 32), (64, 48), (32, 64)]))
    model.append(PackedLinear(nn.Linear(64, 32), keep_plain=True))  # the first shape again: measured once
    # ms (plain, packed) by shape and rows: 64 -> 32 plain faster at 1 row only; 64 -> 48 never (a tie goes to the
    # packed one); 32 -> 64 at both
    timings = {
        (32, 64): {1: (1.0, 2.0), 2: (3.0, 2.0)},
        (48, 64): {1: (1.0, 1.0)},
        (64, 32): {1: (1, 2), 2: (1, 2)},
    }
    asked = []

    def measure(module, rows):
        asked.append(((module.out_features, module.in_features), rows))
        return timings[(module.out_features, module.in_features)][rows]

    assert tune_plain_rows(model, measure) == {(32, 64): 1, (48, 64): 0, (64, 32): 2}
    assert sorted(asked) == [((32, 64), 1), ((32, 64), 2), ((48, 64), 1), ((64, 32), 1), ((64, 32), 2)]
    assert [m.plain_rows for m in model] == [1, 0, 2, 1]
    assert [m.plain is not None for m in model] == [True, False, True, True]
    with torch.inference_mode():
        one, two = torch.randn(1, 64), torch.randn(2, 64)
        assert torch.equal(model[0](one), nn.functional.linear(one, model[0].plain, model[0].bias))
        assert torch.equal(
            model[0](two), torch.ops.mkldnn._linear_pointwise(two, model[0].weight, model[0].bias, "none", [], "")
        )
    plain_ms, packed_ms = measure_linear(PackedLinear(nn.Linear(256, 256), keep_plain=True), 2, repeats=3)
    assert plain_ms > 0 and packed_ms > 0


def test_available_memory_is_memavailable_capped_by_a_cgroup_limit(tmp_path):
    from blip2_serve.deployments.loading import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory(meminfo, cgroup) == 20000000 * 1024  # no cgroup files: the machine's
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("5000\n")
    assert available_memory(meminfo, cgroup) == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{8 << 30}\n")
    (cgroup / "memory.current").write_text(f"{3 << 30}\n")
    assert available_memory(meminfo, cgroup) == 5 << 30
    # the cgroup's inactive file cache (a checkpoint just read) is reclaimable: not counted as used
    (cgroup / "memory.stat").write_text(f"anon {1 << 30}\nfile {2 << 30}\ninactive_file {2 << 30}\n")
    assert available_memory(meminfo, cgroup) == 7 << 30
    # no /proc/meminfo (macOS): psutil's figure for the machine (more than 7 GiB here), still capped by the cgroup
    assert available_memory(tmp_path / "none", cgroup) == 7 << 30
    assert available_memory(tmp_path / "none", tmp_path / "none") > 7 << 30


def test_attention_implementation_reaches_every_tower_and_keeps_tokens(checkpoints):
    """model.attn_implementation: "auto" leaves transformers' choice (SDPA), "eager" reaches the vision tower, the
    Q-Former's and the language model's config alike, and both give the same greedy tokens (tiny OPT)."""
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.generator import LanguageGenerator
    from blip2_serve.deployments.images import check_image
    from blip2_serve.deployments.loading import load_language_model, load_vision
    from blip2_serve.deployments.types import GenerateRequest, GenerationParams
    from blip2_serve.deployments.vision_encoder import VisionEncoder

    from tests.helpers import image_bytes

    def implementations(attention: str) -> set[str]:
        settings = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", attn_implementation=attention)
        vision, language = load_vision(settings)[0], load_language_model(settings)[0]
        return {
            vision.config.vision_config._attn_implementation,
            language.config.text_config._attn_implementation,
            language.language_model.config._attn_implementation,
        }

    assert implementations("auto") == {"sdpa"}
    assert implementations("eager") == {"eager"}

    def tokens(attention: str) -> list[list[int]]:
        settings = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", attn_implementation=attention)
        vision, generator = VisionEncoder(settings), LanguageGenerator(settings)
        embeds = vision.encode([vision.preprocess(check_image(image_bytes(70 + i))) for i in range(3)])
        request = GenerateRequest("a", None, "", GenerationParams(max_new_tokens=8))
        return [list(r.token_ids) for r in generator.run([generator.prepare(request, e) for e in embeds])]

    assert tokens("eager") == tokens("sdpa")


def test_a_t5_packs_its_decode_layers_only(checkpoints, monkeypatch):
    """cpu_linear "auto" for a Flan-T5 (the threshold lowered: the tiny layers are all under it): its decoder's
    linear layers are packed, less the cross-attention's keys and values, which read the encoder's states; the
    encoder keeps PyTorch's layers, so the states every decode step reads have transformers' rounding; the output
    projection is a GreedyHead whose packed logits are proven (prove_packed). "onednn" packs every layer, "torch"
    none; an OPT packs all of its language model's."""
    from blip2_serve.deployments import loading
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.head import GreedyHead
    from blip2_serve.deployments.loading import PackedLinear, load_language_model
    from torch import nn

    def layer_types(llm: str, cpu_linear: str) -> dict[str, type]:
        settings = ModelConfig(checkpoint=str(checkpoints[llm]), device="cpu", cpu_linear=cpu_linear)
        model = load_language_model(settings)[0]
        head = model.language_model.get_output_embeddings()
        inner = {id(head.linear)} if isinstance(head, GreedyHead) else set()
        return {
            name: type(m)
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, PackedLinear)) and id(m) not in inner and ".packed" not in name
        }

    assert PackedLinear not in set(layer_types("t5", "auto").values())  # the real threshold: no tiny layer packs
    monkeypatch.setattr(loading, "PACK_MIN_WEIGHTS", 1)
    t5 = layer_types("t5", "auto")
    packed = {name for name, kind in t5.items() if kind is PackedLinear}
    cross_kv = {n for n in t5 if n.endswith(("EncDecAttention.k", "EncDecAttention.v"))}
    encoder = {n for n in t5 if ".encoder." in n}
    assert cross_kv and encoder and packed
    head = {"language_model.lm_head"}  # unscreened here (too small for "auto"'s screen): PyTorch's, as transformers'
    assert packed == set(t5) - cross_kv - encoder - head  # every decoder layer but the cross-attention's keys, values
    assert all(".decoder." in name for name in packed)
    assert {t5[name] for name in cross_kv | encoder | head} == {nn.Linear}
    settings = ModelConfig(checkpoint=str(checkpoints["t5"]), device="cpu", greedy_screen="on")
    model = load_language_model(settings)[0].language_model
    head = model.get_output_embeddings()
    assert isinstance(head, GreedyHead) and head.packed is not None and head.prove_packed
    assert set(layer_types("t5", "onednn").values()) == {PackedLinear}
    assert set(layer_types("t5", "torch").values()) == {nn.Linear}
    assert set(layer_types("opt", "auto").values()) == {PackedLinear}
    opt = load_language_model(ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", greedy_screen="on"))[0]
    assert not opt.language_model.get_output_embeddings().prove_packed  # OPT's packed logits are taken as they are


def test_cudnn_attention_is_switched_by_every_loader_on_cuda_only(checkpoints, itm_checkpoint, monkeypatch):
    """model.cudnn_attention: on CUDA, PyTorch's process-wide switch for cuDNN's SDPA kernel follows it (off by
    default: its per-shape plans made first calls 4-7x slower on an H200, ModelConfig), and the vision, language-model
    and retrieval loaders each apply it for the device they load on; on CPU the switch is left as it was. This
    machine has no GPU: the switch is checked through the helper with a CUDA device, the loaders' wiring on CPU."""
    from blip2_serve.deployments import loading, retrieval_model
    from blip2_serve.deployments.loading import cuda_attention_backends, load_language_model, load_vision

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        cuda_attention_backends(ModelConfig(checkpoint="x"), torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()  # CPU: untouched
        cuda_attention_backends(ModelConfig(checkpoint="x"), torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # CUDA, default: off
        cuda_attention_backends(ModelConfig(checkpoint="x", cudnn_attention=True), torch.device("cuda"))
        assert torch.backends.cuda.cudnn_sdp_enabled()  # asked for
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)

    seen = []

    def record(config, device):
        seen.append((config.checkpoint, device.type))
        cuda_attention_backends(config, device)

    monkeypatch.setattr(loading, "cuda_attention_backends", record)
    monkeypatch.setattr(retrieval_model, "cuda_attention_backends", record)
    opt = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu")
    load_vision(opt)
    load_language_model(opt)
    retrieval_model.RetrievalModel.load(ModelConfig(checkpoint=str(itm_checkpoint), device="cpu"))
    assert seen == [(str(checkpoints["opt"]), "cpu")] * 2 + [(str(itm_checkpoint), "cpu")]


def test_stages_load_without_the_hubs_kernels_unless_remote_code_is_trusted(checkpoints, itm_checkpoint):
    """transformers kernelizes a model from the Hub by default (use_kernels): code fetched from elsewhere at load.
    The vision, language-model and retrieval loaders turn that off unless model.trust_remote_code; the processor
    loads as before."""
    from blip2_serve.deployments.loading import load_language_model, load_processor, load_vision
    from blip2_serve.deployments.retrieval_model import RetrievalModel

    opt = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu")
    models = [load_vision(opt)[0], load_language_model(opt)[0]]
    models.append(RetrievalModel.load(ModelConfig(checkpoint=str(itm_checkpoint), device="cpu")).model)
    assert [model.use_kernels for model in models] == [False, False, False]
    assert load_processor(opt).num_query_tokens
    trusted = ModelConfig(checkpoint=str(checkpoints["opt"]), device="cpu", trust_remote_code=True)
    assert load_vision(trusted)[0].use_kernels is True  # transformers' default, where the operator trusts it
