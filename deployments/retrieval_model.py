"""BLIP-2 image-text retrieval (`Salesforce/blip2-itm-vit-g` and the like): embeddings, ITM and ITC, batched.

One `Blip2ForImageTextRetrieval` loaded with `from_pretrained`; every output equals what transformers' own
`Blip2VisionModelWithProjection`, `Blip2TextModelWithProjection` and `Blip2ForImageTextRetrieval` give.

Embeddings (what `blip2_embed_image` / `blip2_embed_text` serve, and what search indexes):
- a text: the Q-Former's [CLS] output through `text_projection`, L2-normalised (Blip2TextModelWithProjection's
  `text_embeds[:, 0]`);
- an image: the Q-Former's query outputs through `vision_projection`, each L2-normalised
  (Blip2VisionModelWithProjection's `image_embeds`, [num_query_tokens, D]), then pooled to one vector as the
  L2-normalised mean over the query tokens. One vector per image is what a vector index holds; the cosine of two
  embeddings is their dot product.
Scores for an (image, text) pair (what `blip2_itm` serves):
- ITM: the matching head's probability that the text describes the image, softmax(logits)[1];
- ITC: the contrastive similarity as the model computes it, the maximum over query tokens of the cosine between the
  query token's embedding and the text's. It is not the pooled embeddings' cosine and need not rank the same: search
  with the pooled vectors, then re-rank the top hits by ITM or ITC where that matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from blip2_serve.clients.contract import MAX_PROMPT_TOKENS
from blip2_serve.deployments.config import ModelConfig
from blip2_serve.deployments.errors import InvalidInput
from blip2_serve.deployments.loading import _from_pretrained, cuda_attention_backends, resolve_device, resolve_dtype


@dataclass
class RetrievalModel:
    model: torch.nn.Module  # Blip2ForImageTextRetrieval
    processor: object  # Blip2Processor
    device: torch.device
    dtype: torch.dtype
    max_text_tokens: int = MAX_PROMPT_TOKENS

    @classmethod
    def load(cls, config: ModelConfig) -> RetrievalModel:
        from transformers import AutoProcessor, Blip2ForImageTextRetrieval

        device = resolve_device(config)
        cuda_attention_backends(config, device)
        dtype = resolve_dtype(config, device)
        model = _from_pretrained(Blip2ForImageTextRetrieval, config, dtype=dtype).to(device).eval()
        if not getattr(model.config.qformer_config, "use_qformer_text_input", False):
            raise ValueError(f"{config.checkpoint} is not a retrieval checkpoint (its Q-Former takes no text input)")
        processor = _from_pretrained(AutoProcessor, config)
        # texts are cut at the Q-Former's positions (past them transformers itself fails)
        return cls(model, processor, device, dtype, model.config.qformer_config.max_position_embeddings)

    @property
    def dimension(self) -> int:
        return self.model.config.image_text_hidden_size

    # ---- inputs
    def pixel_values(self, images: Sequence) -> torch.Tensor:
        """Decoded PIL images -> the processor's pixel tensor."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput("TEXT must be non-empty text")
        encoded = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    # ---- model
    @torch.inference_mode()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's output [B, patches + 1, H]: the costly part, and what the stage caches per image."""
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def _query_outputs(self, pixel_values: torch.Tensor | None, vision: torch.Tensor | None = None):
        model = self.model
        if vision is None:
            vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        queries = model.query_tokens.expand(vision.shape[0], -1, -1)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=mask)
        return vision, out.last_hidden_state

    @torch.inference_mode()
    def query_embeddings(self, pixel_values: torch.Tensor | None, vision: torch.Tensor | None = None) -> torch.Tensor:
        """[B, num_query_tokens, D], each L2-normalised (Blip2VisionModelWithProjection's image_embeds); from pixels,
        or from `vision_features` computed before."""
        _, queries = self._query_outputs(pixel_values, vision)
        return F.normalize(self.model.vision_projection(queries.to(self.model.vision_projection.weight.dtype)), dim=-1)

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor | None, vision: torch.Tensor | None = None) -> np.ndarray:
        """[B, D] float32: the L2-normalised mean of the normalised query-token embeddings."""
        pooled = F.normalize(self.query_embeddings(pixel_values, vision).float().mean(dim=1), dim=-1)
        return pooled.cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def _text_embeddings(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model
        embeds = model.embeddings(input_ids=tokens["input_ids"])
        out = model.qformer(query_embeds=embeds, query_length=0, attention_mask=tokens["attention_mask"])
        cls = out.last_hidden_state[:, 0, :].to(model.text_projection.weight.dtype)
        return F.normalize(model.text_projection(cls), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[B, D] float32: the normalised [CLS] projection."""
        return self._text_embeddings(self.tokens(texts)).float().cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def match(
        self, pixel_values: torch.Tensor | None, texts: Sequence[str], vision: torch.Tensor | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ITM probability [B], ITC score [B]) for the pairs (image i, text i); from pixels or vision features."""
        count = (pixel_values if vision is None else vision).shape[0]
        if len(texts) != count:
            raise InvalidInput(f"{count} images and {len(texts)} texts: pairs need as many of each")
        model = self.model
        tokens = self.tokens(texts)
        vision, queries = self._query_outputs(pixel_values, vision)
        # ITM: queries and text attend together, over the image
        query_tokens = model.query_tokens.expand(vision.shape[0], -1, -1)
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=vision.device)
        embeds = model.embeddings(input_ids=tokens["input_ids"], query_embeds=query_tokens)
        out = model.qformer(
            query_embeds=embeds,
            query_length=query_tokens.shape[1],
            attention_mask=torch.cat([query_mask, tokens["attention_mask"]], dim=1),
            encoder_hidden_states=vision,
            encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device),
        )
        hidden = out.last_hidden_state[:, : query_tokens.shape[1], :].to(model.itm_head.weight.dtype)
        itm = model.itm_head(hidden).mean(dim=1).float().softmax(dim=-1)[:, 1]
        # ITC: max over query tokens of the cosine with the text
        image = F.normalize(model.vision_projection(queries.to(model.vision_projection.weight.dtype)), dim=-1)
        text = self._text_embeddings(tokens)
        itc = torch.einsum("bqd,bd->bq", image.float(), text.float()).max(dim=1).values
        return itm.cpu().numpy().astype(np.float32), itc.cpu().numpy().astype(np.float32)
