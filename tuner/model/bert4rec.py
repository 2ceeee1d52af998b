"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer over a user's item history.

Ids: 0 is padding, 1..num_items are items, num_items + 1 is the mask token. The model reads a
left-padded history of length <= max_len and predicts the items behind mask tokens.

Design choices, with reasons:
- Explicit Q/K/V/O linears and `F.scaled_dot_product_attention`, not `nn.MultiheadAttention`,
  whose fused path reads weights directly and bypasses adapters (iLoRA wraps these linears).
- Pre-LayerNorm blocks with a final LayerNorm: trains stably at every size without a long
  warm-up (the seed's post-LN reference lives in benchmarks/ as the peer).
- The head is the paper's: GELU transform, then scores against the item embedding (tied) or a
  separate output matrix (untied, as the seed used), plus a per-item bias. Scores cover items
  1..num_items only: padding and mask can never be predicted or ranked.
- Attention: `attention` picks the kernel. The default, `triton`, is tuner.model.short_attention's
  kernel, one program per sequence and head, reading the fused QKV projection as it is: 2.3x
  less GPU time than SDPA's memory-efficient kernel per 430M layer on an H100, which cut the
  whole 430M step from 16.9 to 15.5 ms (benchmarks/attention_backends.py, gpu_throughput.py's
  `_attn_triton`). Sequences of 129 to 512 positions run `tiled_attention`'s kernels (tiled over
  positions): at the paper's 200 (ML-1M's shape, dropout 0.1, H200) 0.30 ms a layer's forward and
  backward against 0.53 ms on SDPA's memory-efficient kernel, which they replace there
  (benchmarks/results/tiled_attention_h200/). Shapes they do not take (sequences over 512, GPUs
  before sm80, fp32, CPUs) go to `F.scaled_dot_product_attention` with a padding mask and
  dropout, on the memory-efficient kernel: at BERT4Rec's short sequences it beats PyTorch's own
  choice (cuDNN on an H100) by 3% of the whole 130M and 430M step, and it runs on every GPU of
  the cluster.
  Compiled training on CPUs (whose SDPA with dropout is its math kernel anyway) runs that math
  written out with the rate as a graph input (`rate_dropout.dropout_attention`), so trials that
  differ in `attn_dropout` share one compiled graph there.
- `residual="bf16"` (the service's default, `model.residual`) keeps the residual stream in bf16
  under bf16 autocast (`LayerNorm` returns its input's dtype instead of autocast's fp32); fp32 is
  what autocast does. `residual="half"` keeps it in autocast's dtype under fp16 autocast too
  (V100s, `train.amp=fp16`; GradScaler's scale then rides through the stream's gradients in
  fp16), which on sm80+ GPUs also puts fp16's residual adds and norms on `add_norm`'s kernels
  (they take fp16 and bf16 only).
- `forward` returns hidden states; `item_scores` scores chosen rows against the catalog. The
  loss picks the masked rows first, so full-catalog logits are never built for unmasked positions.
- `forward(items, rows=...)` returns the hidden states of those flat positions only (the masked
  ones in training, `last_rows` in evaluation and serving). Only the last block's attention needs
  every position (its keys and values); with `prune_last_layer` (the default) its output
  projection, feed-forward, norms and the head transform run on the chosen rows alone, which are
  ~20% of the positions in training and one in 50 in evaluation. The rows' outputs are the same
  functions of the input either way; only which dropout draws land on them differs.

Single-device code only: no `torch.distributed`, no Ray.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tuner.model import add_norm, short_attention
from tuner.model.rate_dropout import RateDropout, dropout_attention

# model.attention -> the SDPA kernels it allows on a GPU, best first (None: PyTorch's own choice,
# cuDNN on an H100). The math kernel backs up a fused one for inputs it does not take. "triton" is
# tuner.model.short_attention's kernel, with these SDPA kernels for the shapes it does not take.
ATTENTION_BACKENDS = {"auto": None, "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                      "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH], "math": [SDPBackend.MATH],
                      "triton": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}


@dataclass
class Bert4RecConfig:
    num_items: int
    max_len: int = 200
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn: int = 256
    dropout: float = 0.1
    attn_dropout: float = 0.1
    tied_head: bool = True
    fused_qkv: bool = True  # plain Q/K/V linears as one GEMM
    attention: str = "triton"  # a key of ATTENTION_BACKENDS
    # fp32 | bf16 | half: the residual stream's dtype under autocast (`stream_dtype`; config default: bf16)
    residual: str = "fp32"
    # residual dropout + add + LayerNorm on add_norm's kernels where they run (config: auto)
    fused_add_norm: bool = True
    # forward(rows=...): the last block after its attention on those rows alone (False: the whole
    # block at every position, the rows picked before the head transform)
    prune_last_layer: bool = True

    @property
    def mask_token(self) -> int:
        return self.num_items + 1


def _proj(layer: nn.Module, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """A linear, or an iLoRA-adapted linear with its per-sequence expert weights."""
    return layer(x) if gate is None else layer(x, gate)


def _split_proj(layer: nn.Module, x: torch.Tensor,
                gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(layer(x) without its bias, the bias) for a plain linear with a bias, so `add_norm`'s kernel
    adds it (and sums its gradient) in a pass it makes anyway; else (`_proj`'s output, None)."""
    if gate is None and type(layer) is nn.Linear and layer.bias is not None:
        return F.linear(x, layer.weight), layer.bias
    return _proj(layer, x, gate), None


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [N, 1, H]: the flat positions `rows` (into B x L), each a sequence of one, so
    iLoRA's per-sequence gates line up with them (`_take_gate`)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows).unsqueeze(1)


def _take_gate(gate: torch.Tensor | None, rows: torch.Tensor, length: int) -> torch.Tensor | None:
    """iLoRA's gates [B, K] -> [N, K]: each of `rows`' sequence's gate."""
    return None if gate is None else gate.index_select(0, torch.div(rows, length, rounding_mode="floor"))


def _take(x: torch.Tensor, gate: torch.Tensor | None,
          rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x [B, L, H], gate) at `rows`: (`_take_rows`, `_take_gate`); as they are without rows."""
    return (x, gate) if rows is None else (_take_rows(x, rows), _take_gate(gate, rows, x.shape[1]))


def last_rows(items: torch.Tensor) -> torch.Tensor:
    """The flat positions of each sequence's last item (the mask token in evaluation and serving)."""
    batch, length = items.shape
    return torch.arange(1, batch + 1, device=items.device) * length - 1


def stream_dtype(residual: str, x: torch.Tensor) -> torch.dtype | None:
    """The residual stream's dtype for `Bert4RecConfig.residual` under the autocast on at x's device:
    autocast's bf16 for bf16 and half, its fp16 for half alone; None where the stream is left as
    autocast makes it (fp32 from fp32 weights: its layer norms return fp32)."""
    if residual == "fp32" or not torch.is_autocast_enabled(x.device.type):
        return None
    dtype = torch.get_autocast_dtype(x.device.type)
    return dtype if dtype == torch.bfloat16 or (residual == "half" and dtype == torch.float16) else None


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that returns an input in the stream's half dtype (`stream_dtype` of
    `residual`) in that dtype under autocast, which would return fp32. Mean and variance are still
    computed in fp32 inside the kernel."""

    def __init__(self, hidden: int, residual: str = "fp32"):
        super().__init__(hidden)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != stream_dtype(self.residual, x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Bert4RecConfig):
        super().__init__()
        self.heads, self.fused_qkv = cfg.heads, cfg.fused_qkv
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.o_proj = nn.Linear(cfg.hidden, cfg.hidden)
        # the attention weights' dropout: applied inside the attention kernel (Triton's or SDPA's), so
        # this module only holds the rate: its buffer for the Triton kernels and compiled math
        # attention (one compiled graph for every rate), its float for SDPA (dropout_p is a
        # constant of the graph)
        self.attn_dropout = RateDropout(cfg.attn_dropout)
        self.backend = ATTENTION_BACKENDS[cfg.attention]
        self.short_kernel = cfg.attention == "triton"
        self.math_only = cfg.attention == "math"
        self.resid_dropout = RateDropout(cfg.dropout)

    def _qkv(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The Q, K and V projections of x: one [B, L, 3H] tensor with them side by side when they
        run as one GEMM, else three [B, L, H] tensors.

        Plain linears run as one GEMM over their concatenated weights: a wider GEMM keeps the GPU
        busier than three narrow ones, and under autocast the concatenation rides in the cast to
        bf16 that each weight needs anyway. iLoRA-adapted linears run one by one."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_qkv and gate is None and all(type(p) is nn.Linear for p in projections):
            return F.linear(x, torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections]))
        return tuple(_proj(p, x, gate) for p in projections)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, H] -> [B, L, H], or with `rows` [N, 1, H]: the output projection of those
        positions alone (`_take_rows`)."""
        return self.resid_dropout(_proj(self.o_proj, *self._attend_rows(x, keep, gate, rows)))

    def branch(self, x: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` without the residual dropout and, where it can, without the output
        projection's bias: (output, bias or None) for `add_norm`, which applies both."""
        return _split_proj(self.o_proj, *self._attend_rows(x, keep, gate, rows))

    def _attend_rows(self, x: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor | None,
                     rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the heads' outputs, the gate) at every position, or at `rows` alone."""
        return _take(self._attend(x, keep, gate), gate, rows)

    def _attend(self, x: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The heads' outputs side by side, before the output projection."""
        batch, length, hidden = x.shape
        qkv = self._qkv(x, gate)
        dropout = self.attn_dropout.p if self.training else 0.0
        fused = isinstance(qkv, torch.Tensor)
        if self.short_kernel and short_attention.usable(qkv if fused else qkv[0], hidden // self.heads):
            packed = qkv if fused else torch.cat(qkv, dim=-1)
            seed = short_attention.new_seed(x.device) if dropout > 0 else keep.new_zeros(1, dtype=torch.int32)
            return short_attention.attend(packed, keep.view(batch, length), seed, self.attn_dropout.rate,
                                          self.heads, dropout > 0)
        split = lambda t: t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)
        q, k, v = (split(t) for t in (qkv.chunk(3, dim=-1) if fused else qkv))
        # keep: [B, 1, 1, L] bool, True where the key is a real item (bidirectional, no causal mask)
        pin = self.backend is not None and q.is_cuda  # CPUs have the math kernel (and their own flash) only
        if dropout > 0 and (not q.is_cuda or self.math_only) and torch.compiler.is_compiling():
            # SDPA's math kernel with the rate as an input: one compiled graph for every rate
            y = dropout_attention(q, k, v, keep, self.attn_dropout.rate)
        else:
            with sdpa_kernel(self.backend) if pin else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)
        return y.transpose(1, 2).reshape(batch, length, hidden)


class FeedForward(nn.Module):
    def __init__(self, cfg: Bert4RecConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden)
        self.dropout = RateDropout(cfg.dropout)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.dropout(_proj(self.down_proj, F.gelu(_proj(self.up_proj, x, gate)), gate))

    def branch(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `SelfAttention.branch`: (output without dropout or, where it can, bias; bias or None)."""
        return _split_proj(self.down_proj, F.gelu(_proj(self.up_proj, x, gate)), gate)


class Block(nn.Module):
    def __init__(self, cfg: Bert4RecConfig):
        super().__init__()
        self.attn_norm = LayerNorm(cfg.hidden, cfg.residual)
        self.attn = SelfAttention(cfg)
        self.ffn_norm = LayerNorm(cfg.hidden, cfg.residual)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, H] -> [B, L, H], or with `rows` [N, 1, H]: every position's attention, the rest of
        the block at `rows` alone."""
        out = self.attn(self.attn_norm(x), keep, gate, rows)
        x, gate = _take(x, gate, rows)
        x = x + out
        return x + self.ffn(self.ffn_norm(x), gate)

    def forward_fused(self, x: torch.Tensor, normed: torch.Tensor, keep: torch.Tensor, gate: torch.Tensor | None,
                      next_norm: nn.LayerNorm, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on `add_norm`'s kernels: (x, normed) -> (the block's output, `next_norm` of
        it), where `normed` is `attn_norm(x)`. Each residual add, its dropout and the LayerNorm
        after it are one kernel each way. `rows` as in `forward`."""
        resid, ffn = self.attn.resid_dropout, self.ffn.dropout  # each branch's own rate
        out, bias = self.attn.branch(normed, keep, gate, rows)
        x, gate = _take(x, gate, rows)
        x, normed = add_norm.add_norm(x, out, self.ffn_norm, resid.p if self.training else 0.0, resid.rate, bias)
        out, bias = self.ffn.branch(normed, gate)
        return add_norm.add_norm(x, out, next_norm, ffn.p if self.training else 0.0, ffn.rate, bias)


class Bert4Rec(nn.Module):
    def __init__(self, cfg: Bert4RecConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.num_items + 2  # + padding (0) and mask (num_items + 1)
        self.item_emb = nn.Embedding(vocab, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_norm = LayerNorm(cfg.hidden, cfg.residual)
        self.emb_dropout = RateDropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = LayerNorm(cfg.hidden, cfg.residual)
        # the paper's output transform: GELU(h W + b), normalised
        self.head_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.head_norm = LayerNorm(cfg.hidden, cfg.residual)
        self.out_weight = None if cfg.tied_head else nn.Parameter(torch.empty(cfg.num_items, cfg.hidden))
        self.out_bias = nn.Parameter(torch.zeros(cfg.num_items))
        self.router: nn.Module | None = None  # iLoRA's expert router (tuner.model.ilora.apply_ilora)
        self.apply(self._init_weights)
        if self.out_weight is not None:
            nn.init.normal_(self.out_weight, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's truncated-normal(0.02) initialisation
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def forward(self, items: torch.Tensor, item_vectors: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """items: [B, L] int ids (left-padded) -> hidden states [B, L, H] after the head transform,
        or with `rows` (flat positions into B x L, e.g. `last_rows(items)`) those rows' [N, H].
        `item_vectors` [B, L, H]: the items' embedding rows when the caller looked them up."""
        gate = self.router(self, items) if self.router is not None else None
        return self.encode(items, gate, item_vectors, rows)

    def encode(self, items: torch.Tensor, gate: torch.Tensor | None = None,
               item_vectors: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder and head transform; `gate` [B, K] weights iLoRA's experts (None: none);
        `rows` as in `forward`."""
        length = items.shape[1]
        positions = torch.arange(self.cfg.max_len - length, self.cfg.max_len, device=items.device)
        if item_vectors is None:
            item_vectors = self.item_emb(items)
        x = item_vectors + self.pos_emb(positions)
        dtype = stream_dtype(self.cfg.residual, x)
        if dtype is not None:
            x = x.to(dtype)  # fp32 tables (train.weights=fp32, every fp16 run): the stream starts half here
        x = self.emb_dropout(self.emb_norm(x))
        keep = (items != 0)[:, None, None, :]
        # the rows the last block picks (pruned), else the rows picked from the whole output
        inner = rows if self.cfg.prune_last_layer and self.blocks else None
        picks = [None] * (len(self.blocks) - 1) + [inner]
        if self.cfg.fused_add_norm and self.blocks and add_norm.usable(x):
            stream, x = x, self.blocks[0].attn_norm(x)  # each block returns its successor's normed input
            for block, after, pick in zip(self.blocks, [*self.blocks[1:], None], picks):
                stream, x = block.forward_fused(stream, x, keep, gate, after.attn_norm if after else self.final_norm,
                                                pick)
        else:
            for block, pick in zip(self.blocks, picks):
                x = block(x, keep, gate, pick)
            x = self.final_norm(x)
        if rows is not None and inner is None:
            x = _take_rows(x, rows)
        out = self.head_norm(F.gelu(self.head_proj(x)))
        return out if rows is None else out.squeeze(1)

    def output_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [V, H], bias [V]) scoring items 1..V; row i scores item i + 1."""
        weight = self.item_emb.weight[1:-1] if self.out_weight is None else self.out_weight
        return weight, self.out_bias

    def item_scores(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Scores [N, stop - start] of hidden rows [N, H] against items start+1..stop (a chunk)."""
        weight, bias = self.output_embedding()
        stop = weight.shape[0] if stop is None else stop
        return hidden @ weight[start:stop].t() + bias[start:stop]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
