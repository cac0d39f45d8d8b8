"""The language model's output projection on CPU: greedy tokens from a bf16 screen of the logits, exact.

At a decode step the vocabulary projection is the biggest single matmul (OPT's 2560 x 50272 is 515 MB in fp32, a
step of one sequence reads every byte of it), and on a CPU a few rows of it are bound by memory, not by arithmetic.
The engine takes its greedy tokens from a screen instead: the same product in bf16 (half the bytes; measured on 2
cores, one row 20.3 ms as oneDNN fp32 -> 11.4 ms as oneDNN bf16, 16 rows 35.3 -> 28.3 ms), and proves each row's
argmax. With x^ = bf16(x) and w^_j = bf16(w_j), both known, the screen's value s_j (fp32 accumulation of exact
products, rounded to bf16 once) is within

    b_j = ||x^|| * ||w^_j - w_j|| + ||x^ - x|| * ||w_j|| + gamma_2K * ||x^|| * ||w^_j|| + u |s_j| / (1 - u)

of the exact logit x . w_j (u = 2^-8, bf16's unit roundoff; gamma_2K bounds the fp32 accumulation, counted as if
the products were summed in pairs as well). So every token whose screen value plus its bound reaches the best
screen value minus its bound may be the maximum; those few (about ten of 50272 for a random model) are recounted in
float64 and the largest taken: the argmax of the exact logits. PyTorch's own fp32 logits differ from those only by
their own rounding (which the batch's composition already changes), as do oneDNN's. Rows that need whole logits
(sampling, penalties) and every forward outside the engine's greedy steps get the full projection: PyTorch's linear,
or the packed oneDNN one where the model packs its layers (deployments/loading.py, OPT).
"""

from __future__ import annotations

import logging

import torch
from blip2_serve.deployments.loading import PackedLinear
from torch import nn

logger = logging.getLogger(__name__)

UNIT_ROUNDOFF = 2.0**-24  # fp32
BF16_ROUNDOFF = 2.0**-8
# Where the full projection is oneDNN's packed fp32 GEMM, the screen pays up to this many rows: measured on 2 cores,
# OPT's 2560 x 50272, screen + proof against packed fp32 + argmax: 1 row 12.6 vs 21.1 ms, 16 rows 36.6 vs 38.0 ms
# (the proof's passes over the vocabulary eat the GEMM's saving), and a served 16-client run was no faster.
PACKED_SCREEN_ROWS = 4
# The int8 screen takes at most as many rows, packed projection or not: measured on an AVX2 EPYC, 2 cores, OPT's
# 2560 x 50272 at 8 rows int8 35.2 ms against 30.7 packed fp32; the medium T5's 16 captions in the engine 5.82 s with
# the int8 screen at every row count against 4.65 s without it (1 caption 0.88 against 1.04 s).


def without_banned(logits: torch.Tensor, rows: list[int], banned: dict[int, list[int]] | None) -> torch.Tensor:
    """`logits[rows]` (fp32) with each row's `banned` tokens at -inf (a copy where any are banned)."""
    scores = logits[rows].float()
    if banned and any(banned.get(row) for row in rows):
        scores = scores.clone()
        for index, row in enumerate(rows):
            if banned.get(row):
                scores[index, banned[row]] = -float("inf")
    return scores


# "auto" screens an output projection of at least this many weights (16 MB in fp32: read from memory, not a cache, at
# every decode step). Measured: the realistic and medium checkpoints' 2560 x 50272 projection, one row 20-21 -> 10-13
# ms with the screen; the tiny checkpoint's 64 x 601, where the proof's bookkeeping is all there is, 20 tokens in one
# process 31 -> 37 ms (medians of 20 alternated). Sizes in between are unmeasured.
SCREEN_MIN_WEIGHTS = 4 * 1024 * 1024


def screen_kinds() -> list[str]:
    """The screens this CPU computes: "bf16" where oneDNN has bf16 GEMMs here (AVX-512 with bf16, AMX), "int8"
    where PyTorch has its int8 weight-only GEMM (every recent x86 and Arm build)."""
    kinds = []
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        kinds.append("bf16")
    if hasattr(torch, "_weight_int8pack_mm"):
        kinds.append("int8")
    return kinds


def screen_kind(setting: str) -> str | None:
    """The screen ModelConfig.greedy_screen `setting` computes on this CPU: "bf16" or "int8" as named (None where
    this CPU has not that one), and under "auto" or "on" this CPU's first of bf16 (measured where oneDNN has it: one
    row 20.3 -> 11.4 ms) and int8 (measured on an AVX2 CPU without oneDNN's bf16: OPT's 2560 x 50272 at one row 9.7
    ms against 25.7 ms for the packed fp32 projection and 35.9 ms for PyTorch's, at 4 rows 16.2 / 28.3 / 113.6
    ms); None under "off"."""
    kinds = screen_kinds()
    if setting in ("auto", "on"):
        return kinds[0] if kinds else None
    return setting if setting in kinds else None


def wanted_screen(setting: str, model: nn.Module) -> str | None:
    """The screen (screen_kind) ModelConfig.greedy_screen `setting` ("auto", "on", "bf16", "int8", "off") puts on
    `model`'s output projection, or None: "auto" where it is big enough, the others whatever its size, where this
    CPU computes the screen."""
    kind = screen_kind(setting)
    if kind is None or setting != "auto":
        return kind
    weight = getattr(model.get_output_embeddings(), "weight", None)
    return kind if weight is not None and weight.numel() >= SCREEN_MIN_WEIGHTS else None


class GreedyHead(nn.Module):
    """Wraps the output projection `linear`: the full projection (`packed` in oneDNN's layout when the model packs
    its layers, else PyTorch's linear) unless the engine turns `fast` on for its forwards, then the bf16 screen
    (beside a packed projection, and for the int8 screen always, for at most PACKED_SCREEN_ROWS rows)."""

    def __init__(
        self,
        linear: nn.Linear,
        packed: bool = False,
        keep_plain: bool = False,
        kind: str = "bf16",
        prove_packed: bool = False,
    ):
        super().__init__()
        self.linear = linear
        # the same weight packed once (loading.py); `keep_plain`: 1-2 rows on the plain one it holds anyway
        self.packed = PackedLinear(linear, keep_plain=keep_plain) if packed else None
        # `prove_packed`: the packed GEMM is a screen too (the rows over `screen_rows`), its argmax proven like the
        # screen's, and whole logits are PyTorch's linear (a model whose other layers keep transformers' rounding
        # where it matters: Flan-T5, loading.decode_layers); else the packed logits are taken as they are
        self.prove_packed = prove_packed and self.packed is not None
        self.kind = kind
        # the most rows the screen takes (more: the full projection); None, any number
        self.screen_rows = PACKED_SCREEN_ROWS if packed or kind == "int8" else None
        weight = linear.weight.detach()
        self.screen: PackedLinear | None = None
        if kind == "int8":
            # each row as int8 codes times a bf16 scale: a quarter of the bytes. The kernel's products (a bf16 input
            # times a code times a scale: 8 + 7 + 8 significant bits) are exact in fp32, so the bound below holds
            # with w^_j = codes_j * scale_j
            scales = (weight.abs().amax(dim=1) / 127).to(torch.bfloat16)
            scales = torch.where(scales > 0, scales, torch.ones_like(scales))
            codes = torch.clamp(torch.round(weight / scales.float().unsqueeze(1)), -127, 127).to(torch.int8)
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales)
        else:  # bf16 products, fp32 accumulation, bf16 out; the bias added in fp32
            self.screen = PackedLinear.of(weight.to(torch.bfloat16))
        # the weights' part of the bound, for the worst row: ||w^_j - w_j|| + gamma_2K ||w^_j|| and ||w_j||
        features = weight.shape[1]
        gamma = 2 * features * UNIT_ROUNDOFF / (1 - 2 * features * UNIT_ROUNDOFF)
        screened, exact = self.screen_weight().double(), weight.double()
        self.weight_slack = float(((screened - exact).norm(dim=1) + gamma * screened.norm(dim=1)).max())
        self.max_row_norm = float(exact.norm(dim=1).max())
        self.max_bias = 0.0 if linear.bias is None else float(linear.bias.detach().abs().max())
        # the packed fp32 GEMM's part of the bound: gamma_K max ||w_j|| (its inputs and weights are exact)
        self.packed_slack = features * UNIT_ROUNDOFF / (1 - features * UNIT_ROUNDOFF) * self.max_row_norm
        self.fast = False
        # what the last fast call's logits are: "screen" (the bf16 or int8 screen's), "packed" (the packed fp32
        # GEMM's, to be proven) or None (the full projection's, taken as they are)
        self.screened: str | None = None
        self.inputs: torch.Tensor | None = None  # [B, K]: the last fast call's input, last position
        self.checked = 0  # candidate tokens recounted in float64, over all rows
        self.rows = 0
        self.packed_rows = 0  # rows whose packed logits' argmax was proven

    @classmethod
    def install(
        cls,
        model: nn.Module,
        packed: bool = False,
        keep_plain: bool = False,
        kind: str | None = None,
        prove_packed: bool = False,
    ) -> GreedyHead | None:
        """Put a GreedyHead in place of `model`'s output projection where it helps: a plain fp32 nn.Linear on CPU
        with oneDNN available (not quantized or on a GPU), with the `kind` of screen (default: this CPU's, see
        `screen_kind`) where the CPU computes it; returns it, or None. `packed`: the full projection in
        oneDNN's layout too (the model's other layers are packed: deployments/loading.py), computing 1-2 rows with
        PyTorch's linear on the plain weight where `keep_plain` (cpu_linear "auto": loading.PackedLinear);
        `prove_packed`: its argmax proven, whole logits PyTorch's (see __init__)."""
        head = model.get_output_embeddings()
        if isinstance(head, GreedyHead):  # a second engine on the same model, or installed when it was loaded
            return head
        kind = kind or screen_kind("on")
        if (
            kind is None
            or type(head) is not nn.Linear
            or head.weight.device.type != "cpu"
            or head.weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()
            or kind not in screen_kinds()
        ):
            return None
        greedy = cls(head, packed=packed, keep_plain=keep_plain, kind=kind, prove_packed=prove_packed)
        model.set_output_embeddings(greedy)
        logger.info("output projection %s: greedy tokens from a %s screen, checked", tuple(head.weight.shape), kind)
        return greedy

    @property
    def weight(self) -> torch.Tensor:  # what code that reads model.get_output_embeddings().weight expects
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """The whole projection in fp32: oneDNN's packed GEMM where the model packs its layers (and its argmax is
        not proven), else PyTorch's."""
        return self.packed(x) if self.packed is not None and not self.prove_packed else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.full(x)
        self.inputs = x[:, -1] if x.dim() == 3 else x
        if self.screen_rows is None or self.inputs.shape[0] <= self.screen_rows:
            self.screened = "screen"
        elif self.prove_packed:
            self.screened = "packed"
            return self.packed(x)
        else:
            self.screened = None
            return self.full(x)
        screen = self._screen(x.to(torch.bfloat16)).float()
        return screen if self.linear.bias is None else screen + self.linear.bias

    def _screen(self, x: torch.Tensor) -> torch.Tensor:
        """The screen's product of bf16 inputs `[..., K]`, in bf16."""
        if self.screen is not None:
            return self.screen(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return torch._weight_int8pack_mm(flat, self.codes, self.scales).reshape(*x.shape[:-1], -1)

    def screen_weight(self) -> torch.Tensor:
        """The weights `[V, K]` the screen multiplies by, exactly, in fp32."""
        if self.screen is None:
            return self.codes.float() * self.scales.float().unsqueeze(1)
        return self.linear.weight.detach().to(torch.bfloat16).float()

    def exact(self, rows: list[int]) -> torch.Tensor:
        """The full logits `[len(rows), V]` for rows of the last fast call (sampling and processors read these)."""
        return self.full(self.inputs[rows])

    def margin(self, inputs: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`(slack [R, 1], relative)`: each screen value of a row of `inputs [R, K]` is within slack + relative * |its
        value| of the exact logit (float64)."""
        if self.screened == "packed":  # fp32 products of exact inputs and weights, summed in fp32, then the bias
            slack = inputs.double().norm(dim=-1) * self.packed_slack + UNIT_ROUNDOFF * self.max_bias
            return slack.unsqueeze(1), 2 * UNIT_ROUNDOFF
        screened = inputs.to(torch.bfloat16).double()
        rounded = (screened - inputs.double()).norm(dim=-1)
        # the screen's rounding to bf16 is relative to s_j = fast_j - bias_j, so at most |fast_j| + max |bias|; the
        # fp32 addition of the bias is one fp32 rounding more, and an int8 screen's scaling of its sums one more again
        relative = BF16_ROUNDOFF / (1 - BF16_ROUNDOFF) + 3 * UNIT_ROUNDOFF
        slack = screened.norm(dim=-1) * self.weight_slack + rounded * self.max_row_norm + relative * self.max_bias
        return slack.unsqueeze(1), relative

    def greedy(
        self, logits: torch.Tensor, rows: list[int], banned: dict[int, list[int]] | None = None
    ) -> dict[int, int]:
        """The exact argmax of each of `rows` of the last fast call's screen `logits [B, V]`, leaving out a row's
        `banned` tokens (end-of-sequence before a minimum length)."""
        if not self.screened:  # the full projection's logits: their own argmax, as without the screen
            self.rows += len(rows)
            return dict(zip(rows, without_banned(logits, rows, banned).argmax(-1).tolist()))
        inputs = self.inputs[rows]
        whole = rows == list(range(logits.shape[0])) and not any((banned or {}).values())
        fast = logits if whole else without_banned(logits, rows, banned)  # the screen's values, banned at -inf
        slack, relative = self.margin(inputs)
        best = fast.max(dim=-1, keepdim=True).values.double()
        floor = best - slack - relative * best.abs()  # the exact maximum is at least this
        # token j may be the maximum where its exact logit can reach the floor: fast_j + slack + relative |fast_j| >=
        # floor, i.e. (that side being increasing in fast_j) fast_j >= bar, one comparison on the screen's values
        need = floor - slack
        bar = torch.where(need >= 0, need / (1 + relative), need / (1 - relative))
        bar32 = bar.float()
        bar32 = torch.where(bar32.double() > bar, torch.nextafter(bar32, torch.tensor(-float("inf"))), bar32)
        row_of, token_of = (fast >= bar32).nonzero(as_tuple=True)
        weight, bias = self.linear.weight, self.linear.bias
        exact = (inputs[row_of].double() * weight[token_of].double()).sum(dim=-1)  # each candidate's logit, float64
        if bias is not None:
            exact = exact + bias[token_of].double()
        tokens: list[int | None] = [None] * len(rows)
        best_exact: list[float] = [-float("inf")] * len(rows)
        for row, token, value in zip(row_of.tolist(), token_of.tolist(), exact.tolist()):
            if tokens[row] is None or value > best_exact[row]:  # ties: the lowest token id, as argmax takes
                tokens[row], best_exact[row] = token, value
        self.checked += len(token_of)
        self.rows += len(rows)
        self.packed_rows += len(rows) if self.screened == "packed" else 0
        return dict(zip(rows, tokens))
