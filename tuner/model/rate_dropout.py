"""Dropout whose rate reaches a compiled graph as an input, not as a constant.

`nn.Dropout(p)` under `torch.compile` bakes p into the graph, so two trials of a search that
differ in `model.dropout` compile two different graphs: the second finds nothing in inductor's
on-disk cache and compiles from scratch (on the 2-core CPU, tiny size: 45 s against 18 s for a
trial that differed only in learning rate or weight decay; `benchmarks/compile_start.py`,
`benchmarks/results/compile_start_trials_cpu.json`). `RateDropout` keeps the rate in a tensor
buffer as well, and the compiled path reads that, so every rate shares one graph and one cache
entry. Eager runs call `F.dropout` with the float, as `nn.Dropout` does: the same numbers for the
same random state.

`add_norm`'s kernels (on by default under CUDA graphs) read the same buffer, and the attention
kernels (`tuner.model.short_attention`) read the buffer of the `RateDropout` that holds
`model.attn_dropout`. Where attention falls back to SDPA, `dropout_p` is a float argument, a
constant of the graph. On CPUs (and GPUs pinned to `model.attention=math`) SDPA with dropout is
its math kernel, so compiled training there runs `dropout_attention`, that kernel written out
with the rate from the buffer: trials that differ in `model.attn_dropout` share one graph. GPUs
whose attention falls back to SDPA's fused kernels (V100s, sequences over 512) keep them, and
compile a graph per attention-dropout rate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RateDropout(nn.Module):
    """`nn.Dropout(p)` with the rate also in the non-persistent buffer `rate` (checkpoints do not
    change). `p` stays a float: eager runs use it, and whether p > 0 picks the code path (add_norm's
    kernels read the buffer, as the compiled path here does)."""

    def __init__(self, p: float):
        super().__init__()
        self.register_buffer("rate", torch.tensor(0.0, dtype=torch.float32), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        """Sets the float and the buffer together (code that sets `nn.Dropout.p` keeps working)."""
        if not 0.0 <= value < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {value}")
        self._p = float(value)
        with torch.no_grad():
            self.rate.fill_(self._p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if torch.compiler.is_compiling():
            # one fused pass under inductor, as its lowering of F.dropout: keep where a uniform
            # draw reaches the rate, scale the kept by 1 / (1 - rate) in fp32 (a bf16 scale would
            # be off by up to 0.2%), round once
            keep = torch.rand_like(x, dtype=torch.float32) >= self.rate
            return (x.float() * (keep / (1.0 - self.rate))).to(x.dtype)
        return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      rate: torch.Tensor) -> torch.Tensor:
    """Softmax attention with dropout on its weights at `rate` (an fp32 0-d tensor): SDPA's math
    kernel (`_scaled_dot_product_attention_math`: q and k each scaled by the fourth root of the
    head size, the boolean key mask, softmax, dropout, product with v) with the rate as a tensor,
    so the compiled graph takes it as an input. q, k, v: [B, heads, L, head]; keep: [B, 1, 1, L],
    True where the key is a real item. A sequence with no real key gets zeros, as from SDPA."""
    scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
    weights = (q * scale) @ (k * scale).transpose(-2, -1)
    # a finite fill keeps an all-padding row finite; the product with keep then zeroes it
    weights = weights.masked_fill(~keep, torch.finfo(weights.dtype).min).softmax(dim=-1) * keep
    kept = torch.rand_like(weights, dtype=torch.float32) >= rate  # RateDropout's draw and scale
    weights = (weights.float() * (kept / (1.0 - rate))).to(v.dtype)
    return weights @ v
