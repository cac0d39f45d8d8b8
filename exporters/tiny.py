"""Small random BLIP-2 checkpoints with real tokenizers, for offline runs and tests.

The checkpoint is shaped like `Salesforce/blip2-opt-*` or `Salesforce/blip2-flan-t5-*` (same classes,
same processor, same file layout) but tiny, so that `blip2-serve run` works with no model hub. Its
captions are gibberish: the weights are random.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

LlmKind = Literal["opt", "t5"]

# Words the tokenizers are trained on: enough for a few hundred merges and BLIP-2 style prompts.
_CORPUS_WORDS = (
    "a an the of in on at with and or to from by for is are was were be this that these those what which who "
    "where when how why question answer picture photo image of cat dog man woman child people car bus train "
    "street road city tree trees sky cloud clouds sun water sea beach boat mountain snow grass field house room "
    "table chair bed window door kitchen food pizza cake plate cup bottle phone computer book red green blue "
    "yellow black white brown orange pink purple small large big little tall short old young happy sad standing "
    "sitting walking running playing eating holding looking riding flying two three many some one color colour "
    "does do there it he she they his her their its front back left right top bottom near next inside outside "
    "describe caption tell me about please detail shows show showing kind type animal vehicle building person"
).split()

IMAGE_TOKEN = "<image>"


def _corpus(lines: int = 4000, invented_words: int = 0) -> list[str]:
    """Deterministic pseudo-sentences over `_CORPUS_WORDS`, plus `invented_words` made-up words (syllables drawn
    by a seeded generator) for vocabularies as large as the published models' (tens of thousands of tokens)."""
    words = _CORPUS_WORDS
    n = len(words)
    out = []
    for i in range(lines):
        length = 4 + (i * 7) % 9
        out.append(" ".join(words[(i * 31 + j * (i % 13 + 1) * 17) % n] for j in range(length)))
    out.append("Question: what is in the picture? Answer: a cat. Question: what color is it? Answer:")
    if invented_words:
        import numpy as np

        rng = np.random.default_rng(0)
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "st"]
        invented = ["".join(rng.choice(syllables, size=rng.integers(2, 5))) for _ in range(invented_words)]
        out += [" ".join(invented[i : i + 12]) for i in range(0, len(invented), 12)]
    return out


def _opt_tokenizer(vocab_size: int, corpus: list[str]):
    """Byte-level BPE like OPT's GPT-2 tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, BOS (</s>) prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def _unigram_pieces(vocab_size: int, reserved: int, corpus: list[str]) -> list[tuple[str, float]]:
    """SentencePiece-style pieces and log-probability scores counted from the corpus, deterministically.

    (tokenizers' UnigramTrainer breaks ties in hash order, so its vocabulary changes from run to run.)
    """
    counts: Counter[str] = Counter()
    for line in corpus:
        for word in line.replace("?", " ?").replace(".", " .").replace(":", " :").split():
            piece = "▁" + word
            counts[piece] += 3
            for size in (2, 3, 4):
                for start in range(len(piece) - size + 1):
                    counts[piece[start : start + size]] += 1
            for char in piece:
                counts[char] += 1
    singles = sorted(p for p in counts if len(p) == 1)  # every character stays reachable
    longer = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p], p))
    chosen = singles + longer[: max(0, vocab_size - reserved - len(singles))]
    total = sum(counts[p] for p in chosen)
    return [(piece, math.log(counts[piece] / total)) for piece in chosen]


def _t5_tokenizer(vocab_size: int, corpus: list[str]):
    """Unigram (SentencePiece-style) like T5's: <pad>=0 </s>=1 <unk>=2, EOS appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    tok = Tokenizer(models.Unigram(specials + _unigram_pieces(vocab_size, len(specials), corpus), unk_id=2))
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="right"
    )


def _reinitialise(model, seed: int, device: str = "cpu") -> None:
    """Give every weight a visible variance: the default init makes every image give the same caption. The numbers
    are drawn on `device` (a CPU generator's draws differ from a GPU's: the same seed gives other weights there)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                centre = 1.0 if name.endswith("weight") else 0.0
                param.copy_(centre + 0.1 * torch.randn(param.shape, generator=gen, device=device))
            else:
                # std 2/sqrt(fan_in), measured: smaller gives one repeated token for every image.
                std = 2.0 / max(1, param.shape[-1]) ** 0.5 if param.dim() >= 2 else 0.1
                param.copy_(torch.randn(param.shape, generator=gen, device=device) * std)


# Shapes. "tiny": a few kilobytes of weights, for tests. "full": the published shapes of Salesforce/blip2-opt-2.7b
# (ViT-g 1408 x 39 layers, Q-Former 768 x 12 layers with 32 queries, OPT-2.7b 2560 x 32 layers, vocab 50272) and of
# Salesforce/blip2-flan-t5-xl (Flan-T5-XL 2048, d_ff 5120, 24 + 24 layers, vocab 32128): for GPUs. The others keep
# those widths with fewer layers, so that kernels see real shapes on a small machine (benchmarks):
# "realistic": layer counts chosen so that a 20-token caption's FLOPs split between vision tower, Q-Former and
#   language model as the published models' do (within 25%; bench/flops.py states the arithmetic): the vision tower
#   is most of the work, as on the real blip2-opt-2.7b.
# "medium": 2 layers in every tower: decode dominates (the 50k-vocabulary projection), the decode-heavy workload.
SIZES = {
    "tiny": {
        "image_size": 32,
        "patch_size": 8,
        "num_query_tokens": 8,
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "qformer": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 128,
            "max_position_embeddings": 64,
            "cross_attention_frequency": 1,
        },
        "opt": {
            "hidden_size": 64,
            "word_embed_proj_dim": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
        },
        "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
    },
    "medium": {
        "image_size": 224,
        "patch_size": 14,
        "num_query_tokens": 32,
        "vision": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 2, "num_attention_heads": 16},
        "qformer": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 2,
            "num_attention_heads": 12,
            "vocab_size": 30522,
            "max_position_embeddings": 512,
            "cross_attention_frequency": 2,
        },
        "opt": {
            "hidden_size": 2560,
            "word_embed_proj_dim": 2560,
            "ffn_dim": 10240,
            "num_hidden_layers": 2,
            "num_attention_heads": 32,
            "max_position_embeddings": 2048,
            "vocab_size": 50272,
        },
        "t5": {
            "d_model": 2048,
            "d_kv": 64,
            "d_ff": 5120,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 32,
            "vocab_size": 32128,
        },
    },
}


def _with_layers(size: str, vision: int, qformer: int, opt: int, t5: tuple[int, int]) -> dict:
    """`size`'s shapes with other layer counts (t5: encoder, decoder)."""
    shape = {key: dict(value) if isinstance(value, dict) else value for key, value in SIZES[size].items()}
    shape["vision"]["num_hidden_layers"] = vision
    shape["qformer"]["num_hidden_layers"] = qformer
    shape["opt"]["num_hidden_layers"] = opt
    shape["t5"]["num_layers"], shape["t5"]["num_decoder_layers"] = t5
    return shape


SIZES["full"] = _with_layers("medium", vision=39, qformer=12, opt=32, t5=(24, 24))
SIZES["realistic"] = _with_layers("medium", vision=6, qformer=1, opt=4, t5=(3, 3))


def make_tiny_checkpoint(
    out_dir: str | Path,
    llm: LlmKind = "opt",
    *,
    size: str = "tiny",
    vocab_size: int = 600,
    seed: int = 0,
    dtype: str = "fp32",
    device: str = "cpu",
) -> Path:
    """Write a small random BLIP-2 checkpoint (safetensors + processor + tokenizer) to `out_dir`.

    Loads through `Blip2ForConditionalGeneration.from_pretrained(out_dir)` and `Blip2Processor.from_pretrained`,
    exactly as a hub checkpoint does. `size` picks the shapes (SIZES); for "medium" the tokenizer is trained to the
    published vocabulary size on a corpus with made-up words, so that generated ids decode to text. `dtype` (fp32,
    fp16, bf16) is what the weights are saved in; `device` where they are made ("cuda" for the published shapes:
    seconds there against many minutes on a CPU).
    """
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
        T5Config,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    if llm not in ("opt", "t5"):
        raise ValueError(f"llm must be 'opt' or 't5', not {llm!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    shape = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    text_shape = dict(shape[llm])
    model_vocab = text_shape.pop("vocab_size", 0)
    if model_vocab:  # the tokenizer covers the model's whole vocabulary (+ <image>), so every id has text
        vocab_size, corpus = model_vocab - 1, _corpus(invented_words=2 * model_vocab)
    else:
        corpus = _corpus()
    tokenizer = _opt_tokenizer(vocab_size, corpus) if llm == "opt" else _t5_tokenizer(vocab_size, corpus)
    image_size, num_query_tokens = shape["image_size"], shape["num_query_tokens"]
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = max(len(tokenizer), model_vocab)

    vision = Blip2VisionConfig(
        **shape["vision"], image_size=image_size, patch_size=shape["patch_size"], initializer_range=0.02
    )
    qformer = Blip2QFormerConfig(**shape["qformer"], encoder_hidden_size=shape["vision"]["hidden_size"])
    if llm == "opt":
        text = OPTConfig(
            vocab_size=vocab,
            **text_shape,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    else:
        text = T5Config(
            vocab_size=vocab,
            **text_shape,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
    )
    from blip2_serve.deployments.loading import _DTYPES as dtypes  # the names ModelConfig.dtype takes

    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, not {dtype!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).eval()
    _reinitialise(model, seed, device)
    model.to(dtypes[dtype]).save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("wrote a tiny BLIP-2 (%s) checkpoint to %s", llm, out)
    return out


def _bert_tokenizer(vocab_size: int, corpus: list[str]):
    """WordPiece like the Q-Former's BERT tokenizer (bert-base-uncased): [PAD]=0 ... [CLS] text [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", do_lower_case=True,
    )  # fmt: skip


def make_tiny_itm_checkpoint(out_dir: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A small random BLIP-2 image-text retrieval checkpoint, shaped as `Salesforce/blip2-itm-vit-g`: vision tower,
    Q-Former with its text input (`use_qformer_text_input`), vision/text projections and the ITM head; no language
    model. Loads with `Blip2ForImageTextRetrieval`, `Blip2VisionModelWithProjection`, `Blip2TextModelWithProjection`
    and `Blip2Processor` `from_pretrained(out_dir)`. "medium": blip2-itm-vit-g's widths (ViT-g 1408, Q-Former 768,
    256-dimensional embeddings) with 2 layers per tower, for benchmarks."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    shape = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qformer_shape = dict(shape["qformer"])
    tokenizer = _bert_tokenizer(min(qformer_shape["vocab_size"], 4000), _corpus())
    image_size = shape["image_size"]
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer)
    vision = Blip2VisionConfig(
        **shape["vision"], image_size=image_size, patch_size=shape["patch_size"], initializer_range=0.02
    )
    qformer_shape["vocab_size"] = len(tokenizer)
    qformer = Blip2QFormerConfig(
        **qformer_shape,
        encoder_hidden_size=shape["vision"]["hidden_size"],
        use_qformer_text_input=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2).to_dict(),
        num_query_tokens=shape["num_query_tokens"],
        image_text_hidden_size=16 if size == "tiny" else 256,
    )
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    _reinitialise(model, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
