"""`python bench/sdpa_ab.py` on a GPU: first-call and warm latency with PyTorch's cuDNN SDPA kernel on and off.

The experiment behind ModelConfig.cudnn_attention, as it ran on an H200 on 2026-12-04 (bench/results/
cudnn-attention-h200.md; run from outside the checkout with the installed package first, as bench/device_check.sh
does). It builds a random-weight checkpoint at the full blip2-opt-2.7b shapes in fp16, then, in one process per
setting (the switch is process-wide), times this project's stages (vision + the continuous engine) and transformers'
generate: each workload's first call (new shapes) and then warm calls. Not in the suite: it needs a GPU."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(ck: str, flag: bool) -> None:
    import torch

    torch.backends.cuda.enable_cudnn_sdp(flag)
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.deployments.engine import ContinuousBatcher
    from blip2_serve.deployments.generator import LanguageGenerator
    from blip2_serve.deployments.vision_encoder import VisionEncoder

    from bench import QUESTIONS
    from bench.device_check import NEW_TOKENS, _images, _run_engine, _timed, generate_answers, load_reference

    # the stages' loaders set the process-wide switch from the config (loading.cuda_attention_backends)
    model = ModelConfig(checkpoint=ck, device="cuda", dtype="fp16", cudnn_attention=flag)
    enc, gen = VisionEncoder(model), LanguageGenerator(model)
    eng = ContinuousBatcher(gen, max_running=64)
    proc, hf = load_reference(Path(ck), "cuda", torch.float16)
    images = _images(8, 224)
    prompts = [f"Question: {q} Answer:" for q in QUESTIONS]

    def stages(group, ps):
        emb = list(enc.encode([enc.preprocess(i) for i in group]))
        if len(emb) == 1 and len(ps) > 1:
            emb = emb * len(ps)
        return _run_engine(eng, gen, emb, NEW_TOKENS, ps)

    def T(f):
        return round(_timed(f, "cuda")[0], 3)

    out = {"cudnn_sdp": flag}
    out["stages_lone_first"] = T(lambda: stages(images[:1], [""]))
    out["stages_lone_warm"] = [T(lambda i=i: stages(images[i : i + 1], [""])) for i in (1, 2, 3)]
    out["stages_5q_first"] = T(lambda: stages(images[:1], prompts))
    out["stages_5q_warm"] = [T(lambda: stages(images[1:2], prompts)) for _ in range(2)]
    out["stages_16_first"] = T(lambda: stages(images * 2, [""] * 16))
    out["stages_16_warm"] = [T(lambda: stages(images * 2, [""] * 16)) for _ in range(2)]
    out["hf_lone_first"] = T(lambda: generate_answers(proc, hf, images[:1], "cuda", torch.float16))
    out["hf_lone_warm"] = [
        T(lambda i=i: generate_answers(proc, hf, images[i : i + 1], "cuda", torch.float16)) for i in (1, 2, 3)
    ]
    out["hf_16_first"] = T(lambda: generate_answers(proc, hf, images * 2, "cuda", torch.float16))
    out["hf_16_warm"] = [T(lambda: generate_answers(proc, hf, images * 2, "cuda", torch.float16)) for _ in range(2)]
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        child(sys.argv[1], sys.argv[2] == "1")
        sys.exit(0)
    from blip2_serve.exporters.tiny import make_tiny_checkpoint

    ck = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "full-opt", "opt", size="full", dtype="fp16", device="cuda")
    for flag in ("1", "0"):
        t = time.time()
        r = subprocess.run([sys.executable, __file__, str(ck), flag], capture_output=True, text=True, timeout=110)
        print(
            [line for line in r.stdout.splitlines() if line.startswith("RESULT")] or r.stderr[-3000:],
            f"({time.time() - t:.0f} s)",
            flush=True,
        )
