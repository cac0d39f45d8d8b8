"""The language model's output projection for the continuous engine on CPU: greedy tokens from a fast GEMM, exact.

At a decode step the vocabulary projection is the biggest matmul: Flan-T5's is 2048 x 32128 (263 MB in fp32), and
PyTorch's CPU linear, which repacks the weight on every call, takes 53 ms for a 16-row step on 2 cores where oneDNN's
GEMM on a weight packed once takes 13 ms (1 row: 14 -> 10 ms). But a faster GEMM rounds differently, and a greedy
token must stay the one transformers picks. So the engine takes the fast logits and proves each row's argmax:

    |fast_j - exact_j| <= gamma_K * ||x|| * ||w_j||  (an fp32 dot product of K terms, gamma_K = K u / (1 - K u))

Where the fast top two are further apart than twice that bound, the fast argmax is the exact one. Otherwise the
columns that could still be the maximum (within twice the bound of the fast maximum) are recomputed in float64 and
the largest taken: the argmax of the exact logits (PyTorch's own fp32 logits differ from those only by their own
rounding, which batch composition already changes). Rows that need whole logits (sampling, penalties) get PyTorch's
linear, as before.

Used where the model's other layers keep PyTorch's linear (`cpu_linear` torch, or auto for Flan-T5: packing every
layer changed T5's answers); an OPT checkpoint packs its whole model (deployments/loading.py) and needs none.
"""

from __future__ import annotations

import logging

import torch
from blip2_serve.deployments.loading import PackedLinear
from torch import nn

logger = logging.getLogger(__name__)

UNIT_ROUNDOFF = 2.0**-24  # fp32


def without_banned(logits: torch.Tensor, rows: list[int], banned: dict[int, list[int]] | None) -> torch.Tensor:
    """`logits[rows]` (fp32) with each row's `banned` tokens at -inf (a copy where any are banned)."""
    scores = logits[rows].float()
    if banned and any(banned.get(row) for row in rows):
        scores = scores.clone()
        for index, row in enumerate(rows):
            if banned.get(row):
                scores[index, banned[row]] = -float("inf")
    return scores


class GreedyHead(nn.Module):
    """Wraps the output projection `linear`; PyTorch's linear unless the engine turns `fast` on for its forwards."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.packed = PackedLinear(linear)  # the same weight, packed once for oneDNN (deployments/loading.py)
        weight = linear.weight.detach()
        self.max_row_norm = float(weight.norm(dim=1).max())
        features = weight.shape[1]
        self.gamma = features * UNIT_ROUNDOFF / (1 - features * UNIT_ROUNDOFF)
        self.fast = False
        self.inputs: torch.Tensor | None = None  # [B, K]: the last fast call's input, last position
        self.checked = 0  # rows whose argmax needed a float64 recount
        self.rows = 0

    @classmethod
    def install(cls, model: nn.Module) -> GreedyHead | None:
        """Put a GreedyHead in place of `model`'s output projection where it helps: a plain fp32 nn.Linear on CPU
        with oneDNN available (not already packed, quantized or on a GPU); returns it, or None."""
        head = model.get_output_embeddings()
        if isinstance(head, GreedyHead):  # a second engine on the same model
            return head
        if (
            type(head) is not nn.Linear
            or head.weight.device.type != "cpu"
            or head.weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()
        ):
            return None
        greedy = cls(head)
        model.set_output_embeddings(greedy)
        logger.info("output projection %s: greedy tokens from oneDNN's GEMM, checked", tuple(head.weight.shape))
        return greedy

    @property
    def weight(self) -> torch.Tensor:  # what code that reads model.get_output_embeddings().weight expects
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.linear(x)
        self.inputs = x[:, -1] if x.dim() == 3 else x
        return self.packed(x)

    def exact(self, rows: list[int]) -> torch.Tensor:
        """PyTorch's logits `[len(rows), V]` for rows of the last fast call (sampling and processors read these)."""
        return self.linear(self.inputs[rows])

    def greedy(
        self, logits: torch.Tensor, rows: list[int], banned: dict[int, list[int]] | None = None
    ) -> dict[int, int]:
        """The exact argmax of each of `rows` of the last fast call's `logits [B, V]`, leaving out a row's `banned`
        tokens (end-of-sequence before a minimum length)."""
        inputs = self.inputs[rows]
        fast = without_banned(logits, rows, banned)
        top = fast.topk(2, dim=-1)
        bound = self.gamma * inputs.norm(dim=-1) * self.max_row_norm
        tokens = top.indices[:, 0].tolist()
        unsure = (top.values[:, 0] - top.values[:, 1] <= 2 * bound).nonzero().flatten().tolist()
        self.rows += len(rows)
        self.checked += len(unsure)
        weight, bias = self.linear.weight, self.linear.bias
        for index in unsure:
            candidates = (fast[index] >= top.values[index, 0] - 2 * bound[index]).nonzero().flatten()
            exact = inputs[index].double() @ weight[candidates].double().T
            if bias is not None:
                exact = exact + bias[candidates].double()
            tokens[index] = int(candidates[int(exact.argmax())])
        return dict(zip(rows, tokens))
