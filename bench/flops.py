"""How a caption's work splits between the vision tower, the Q-Former and the language model, in matmul FLOPs.

The bench's "realistic" checkpoints (exporters/tiny.SIZES) keep the published widths with fewer layers, chosen so
that these proportions stay within 25% of the published models' ("full"). Counted: every matmul of the transformer
layers (2 FLOPs per multiply-add), attention scores and weighted sums included; layer norms, activations and
softmax left out (a few percent). A caption with greedy decoding:
- vision tower: (image/patch)^2 + 1 tokens through every layer: q, k, v, o projections 4*T*h^2, MLP 2*T*h*i,
  attention 2*T^2*h;
- Q-Former: the query tokens through every layer (self-attention and MLP), cross-attention to the vision tokens
  every `cross_attention_frequency` layers (k, v projections of all T vision tokens), then the language projection;
- OPT: a prefill of queries + prompt tokens (the vocabulary projection for the last position only), then one token
  per step with the cache (attention over the context so far) and its vocabulary projection;
- Flan-T5: the encoder over queries + prompt, the decoder one token per step (self-attention, cross-attention over
  the encoder states whose k, v are projected once per layer, gated MLP) and its vocabulary projection.
"""

from __future__ import annotations

from blip2_serve.exporters.tiny import SIZES

PROPORTION_TOLERANCE = 0.25  # the bound: each part's share of the LLM's work within 25% of the real model's
TINY_VOCAB = 600  # make_tiny_checkpoint's tokenizer size where SIZES names no vocabulary (the "tiny" shapes)


def _vision(shape: dict) -> tuple[float, int]:
    v = shape["vision"]
    h, i, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (shape["image_size"] // shape["patch_size"]) ** 2
    tokens = patches + 1
    embed = patches * 3 * shape["patch_size"] ** 2 * h
    per_layer = 4 * tokens * h * h + 2 * tokens * h * i + 2 * tokens * tokens * h
    return 2.0 * (embed + layers * per_layer), tokens


def _qformer(shape: dict, vision_tokens: int, llm_hidden: int) -> float:
    q = shape["qformer"]
    h, i, queries = q["hidden_size"], q["intermediate_size"], shape["num_query_tokens"]
    encoder_hidden = shape["vision"]["hidden_size"]
    macs = 0
    for layer in range(q["num_hidden_layers"]):
        macs += 4 * queries * h * h + 2 * queries * queries * h + 2 * queries * h * i
        if layer % q["cross_attention_frequency"] == 0:
            macs += 2 * queries * h * h + 2 * vision_tokens * encoder_hidden * h + 2 * queries * vision_tokens * h
    macs += queries * h * llm_hidden  # language projection
    return 2.0 * macs


def _opt(shape: dict, prompt_tokens: int, new_tokens: int) -> float:
    o = shape["opt"]
    h, f, layers, vocab = o["hidden_size"], o["ffn_dim"], o["num_hidden_layers"], o.get("vocab_size", TINY_VOCAB)
    prefill = shape["num_query_tokens"] + prompt_tokens
    dense = 4 * h * h + 2 * h * f  # per token per layer
    macs = layers * (prefill * dense + prefill * prefill * h)  # attention over the prompt, causal (~half of 2*P^2*h)
    for step in range(1, new_tokens):  # the first new token comes out of the prefill
        macs += layers * (dense + 2 * (prefill + step) * h)
    macs += new_tokens * h * vocab
    return 2.0 * macs


def _t5(shape: dict, prompt_tokens: int, new_tokens: int) -> float:
    t = shape["t5"]
    d, inner, ff, vocab = t["d_model"], t["d_kv"] * t["num_heads"], t["d_ff"], t.get("vocab_size", TINY_VOCAB)
    encoded = shape["num_query_tokens"] + prompt_tokens
    encoder = t["num_layers"] * encoded * (4 * d * inner + 3 * d * ff + 2 * encoded * inner)
    decoder = t["num_decoder_layers"] * 2 * encoded * d * inner  # cross-attention k, v, once
    for step in range(1, new_tokens + 1):
        self_attention = 4 * d * inner + 2 * step * inner
        cross_attention = 2 * d * inner + 2 * encoded * inner
        decoder += t["num_decoder_layers"] * (self_attention + cross_attention + 3 * d * ff)
    return 2.0 * (encoder + decoder + new_tokens * d * vocab)


def caption_flops(size: str, llm: str, new_tokens: int = 20) -> dict[str, float]:
    """GFLOP of one caption (no prompt: OPT's BOS, T5's </s>) by part: vision, qformer, llm."""
    shape = SIZES[size]
    vision, vision_tokens = _vision(shape)
    llm_hidden = shape["opt"]["hidden_size"] if llm == "opt" else shape["t5"]["d_model"]
    language = _opt(shape, 1, new_tokens) if llm == "opt" else _t5(shape, 1, new_tokens)
    return {
        "vision": vision / 1e9,
        "qformer": _qformer(shape, vision_tokens, llm_hidden) / 1e9,
        "llm": language / 1e9,
    }


def proportions(size: str, llm: str, reference: str = "full", new_tokens: int = 20) -> dict:
    """The vision : Q-Former : LLM split of `size` against `reference`'s, as ratios to the LLM's work, and whether
    each is within PROPORTION_TOLERANCE of the reference's."""
    ours, theirs = caption_flops(size, llm, new_tokens), caption_flops(reference, llm, new_tokens)
    parts = {}
    for part in ("vision", "qformer"):
        mine, real = ours[part] / ours["llm"], theirs[part] / theirs["llm"]
        parts[part] = {"per_llm": round(mine, 3), "reference_per_llm": round(real, 3), "off": round(mine / real - 1, 3)}
    total = sum(ours.values())
    return {
        "size": size,
        "llm": llm,
        "gflop": {part: round(value, 2) for part, value in ours.items()},
        "reference_gflop": {part: round(value, 2) for part, value in theirs.items()},
        "vision_share": round(ours["vision"] / total, 3),
        "reference_vision_share": round(theirs["vision"] / sum(theirs.values()), 3),
        "parts": parts,
        "within_tolerance": all(abs(p["off"]) <= PROPORTION_TOLERANCE for p in parts.values()),
    }


if __name__ == "__main__":
    import json

    for name in ("realistic", "medium"):
        for kind in ("opt", "t5"):
            print(json.dumps(proportions(name, kind)))
