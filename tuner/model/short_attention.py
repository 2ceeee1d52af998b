"""Self-attention for short sequences on CUDA: one Triton program per (sequence, head).

BERT4Rec's histories are short (50 items at the seed's settings). At that length a whole head's
Q, K and V (50 x 64 each) and its 50 x 50 scores fit in one program's registers, so:

- Forward, `_attention_forward_kernel`: scores, key-padding mask, softmax, attention dropout and the
  product with V in one pass, reading Q, K and V straight out of the fused QKV projection
  [B, L, 3H] and writing the output in the [B, L, H] layout the output projection reads. No
  transposes, no log-sum-exp or mask kept for the backward.
- Backward, `_attention_backward_kernel`: recomputes the softmax and the dropout mask (counter-based
  Philox at `tiled_attention.ROUNDS` rounds, 16-bit uniforms, keyed by a seed drawn on the device
  each call) and writes dQ, dK and dV into one [B, L, 3H] gradient, which is the fused
  projection's output gradient as it stands: no concatenation. One program owns all of a head's
  keys, so there are no atomics.

The general kernels (PyTorch's memory-efficient and cuDNN attention) tile for long sequences:
at length 50 they pad to 64-wide tiles, keep a log-sum-exp for the backward and need the Q, K
and V gradients concatenated afterwards.

`short_attention(qkv, keep, seed, rate, heads, dropout)` is a `torch.library` custom op with its own
autograd formula, so `torch.compile` (CUDA graphs included) treats it as one opaque call. The
kernels read the dropout rate from `rate`, a 0-d tensor (the model's `RateDropout` buffer), so
trials of a search that differ in `model.attn_dropout` share one compiled graph; only whether
there is dropout at all is a constant of the graph.
`usable(...)` says whether the kernels take a shape: a CUDA GPU of sm80 or newer (or Triton's
interpreter), fp16/bf16 (any float under the interpreter), a power-of-two head size of 16 to 128 and at most
`MAX_LENGTH` positions; the model falls back to `F.scaled_dot_product_attention` otherwise.
`attend(...)`, the model's entry, runs these kernels up to `SHORT_LENGTH` positions and
`tuner.model.tiled_attention`'s (tiled over positions, the same contract) beyond.

A sequence whose keys are all padding gets zeros (SDPA gives NaN there). The kernels run on CPU
tensors under `TRITON_INTERPRET=1`, which is how the tests check them against PyTorch's
attention with the same dropout mask (`dropout_keep_mask`).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from tuner.model import tiled_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `usable` is False and the model uses SDPA
    triton = None

SHORT_LENGTH = 128  # one program holds BLOCK_L x BLOCK_L scores (BLOCK_L: the length rounded up to 2^k)
MAX_LENGTH = 512  # the longest `usable` takes: tiled_attention's kernels past SHORT_LENGTH (timed at 200 and 512)
HEAD_DIMS = (16, 32, 64, 128)


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read once: torch.compile traces `usable`
_enabled = True  # `portable()` turns the kernels off while a graph is exported


@torch._dynamo.assume_constant_result  # traced once, a constant in the compiled graph
def _ampere_or_newer(index: int) -> bool:
    """The kernels are built and measured for sm80 and up (A100, L4, H100); a V100 keeps SDPA."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


@contextlib.contextmanager
def portable():
    """Within this block the model uses SDPA only, so a graph exported from it (`torch.export`)
    holds ATen ops and runs where this package and Triton are absent."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def enabled() -> bool:
    """False inside `portable()`: the model's Triton kernels (this one, `add_norm`'s) stand down."""
    return _enabled


def usable(projection: torch.Tensor, head_dim: int) -> bool:
    """True when the kernels take attention over `projection` (the fused [B, L, 3H] QKV output, or
    one of Q, K, V: its device, dtype and length decide) with heads of `head_dim`. Asked before
    the three projections of iLoRA-adapted layers are concatenated for the kernel, so a shape the
    kernel does not take costs no copy."""
    if triton is None or not _enabled or projection.dim() != 3:
        return False
    device_ok = INTERPRETING or (projection.is_cuda and projection.dtype in (torch.float16, torch.bfloat16)
                                 and _ampere_or_newer(projection.device.index))
    return device_ok and head_dim in HEAD_DIMS and projection.shape[1] <= MAX_LENGTH


def _block(length: int) -> int:
    return max(16, 1 << (length - 1).bit_length())


if triton is not None:

    from tuner.model.tiled_attention import keep_tile, threshold16

    @triton.jit
    def _keep_bits(seed, bh, rows, p, BLOCK_L: tl.constexpr, ROUNDS: tl.constexpr):
        """The dropout mask of head `bh`, [BLOCK_L, BLOCK_L]: True where an attention weight is kept.
        One Philox call per eight weights (`tiled_attention.keep_tile`: four 32-bit draws, each
        two 16-bit uniforms), an eighth of the calls `tl.rand` would make."""
        group = tl.arange(0, BLOCK_L // 8)
        offsets = bh * (BLOCK_L * BLOCK_L // 8) + rows[:, None] * (BLOCK_L // 8) + group[None, :]
        return keep_tile(seed, offsets, threshold16(p), BLOCK_L, BLOCK_L, ROUNDS)[0]

    @triton.jit
    def _softmax(QKV, KEEP, b, h, rows, dims, L, stride_b, stride_l, stride_keep, scale,
                 H: tl.constexpr, D: tl.constexpr):
        """(q, k, v, probabilities) of head h of sequence b; padded keys get probability 0."""
        row_ok = rows < L
        ptrs = QKV + b * stride_b + h * D + rows[:, None] * stride_l + dims[None, :]
        q = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        k = tl.load(ptrs + H, mask=row_ok[:, None], other=0.0)
        v = tl.load(ptrs + 2 * H, mask=row_ok[:, None], other=0.0)
        key_ok = tl.load(KEEP + b * stride_keep + rows, mask=row_ok, other=0) != 0
        s = tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)  # log2(e): exp2 below
        s = tl.where(key_ok[None, :], s, float("-inf"))
        top = tl.max(s, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)  # a sequence of padding only: all zeros
        e = tl.exp2(s - top[:, None])
        total = tl.sum(e, axis=1)
        return q, k, v, e / tl.where(total == 0.0, 1.0, total)[:, None]

    @triton.jit
    def _attention_forward_kernel(QKV, KEEP, SEED, RATE, OUT, L, heads, stride_b, stride_l, stride_keep, stride_ob,
                                  stride_ol, scale, H: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                                  DROPOUT: tl.constexpr, ROUNDS: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // heads, bh % heads
        rows, dims = tl.arange(0, BLOCK_L), tl.arange(0, D)
        q, k, v, probs = _softmax(QKV, KEEP, b, h, rows, dims, L, stride_b, stride_l, stride_keep, scale, H, D)
        if DROPOUT:
            p = tl.load(RATE)
            probs = tl.where(_keep_bits(tl.load(SEED), bh, rows, p, BLOCK_L, ROUNDS), probs / (1.0 - p), 0.0)
        out = tl.dot(probs.to(v.dtype), v)
        ptrs = OUT + b * stride_ob + h * D + rows[:, None] * stride_ol + dims[None, :]
        tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=(rows < L)[:, None])

    @triton.jit
    def _attention_backward_kernel(QKV, KEEP, SEED, RATE, GRAD, DQKV, L, heads, stride_b, stride_l, stride_keep,
                                   stride_gb, stride_gl, stride_db, stride_dl, scale,
                                   H: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, DROPOUT: tl.constexpr,
                                   ROUNDS: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // heads, bh % heads
        rows, dims = tl.arange(0, BLOCK_L), tl.arange(0, D)
        row_ok = rows < L
        q, k, v, probs = _softmax(QKV, KEEP, b, h, rows, dims, L, stride_b, stride_l, stride_keep, scale, H, D)
        grad = tl.load(GRAD + b * stride_gb + h * D + rows[:, None] * stride_gl + dims[None, :],
                       mask=row_ok[:, None], other=0.0)
        # out = dropped @ v, dropped = probs * mask / (1 - p)
        dropped_grad = tl.dot(grad, tl.trans(v))
        if DROPOUT:
            p = tl.load(RATE)
            kept = _keep_bits(tl.load(SEED), bh, rows, p, BLOCK_L, ROUNDS)
            dropped = tl.where(kept, probs / (1.0 - p), 0.0)
            probs_grad = tl.where(kept, dropped_grad / (1.0 - p), 0.0)
        else:
            dropped = probs
            probs_grad = dropped_grad
        dv = tl.dot(tl.trans(dropped.to(v.dtype)), grad)
        # softmax backward: ds = p * (dp - sum_j p_j dp_j)
        ds = probs * (probs_grad - tl.sum(probs * probs_grad, axis=1)[:, None])
        ds = ds.to(q.dtype)
        dq = tl.dot(ds, k) * scale
        dk = tl.dot(tl.trans(ds), q) * scale
        ptrs = DQKV + b * stride_db + h * D + rows[:, None] * stride_dl + dims[None, :]
        out_ty = DQKV.dtype.element_ty
        tl.store(ptrs, dq.to(out_ty), mask=row_ok[:, None])
        tl.store(ptrs + H, dk.to(out_ty), mask=row_ok[:, None])
        tl.store(ptrs + 2 * H, dv.to(out_ty), mask=row_ok[:, None])

    @triton.jit
    def _attention_mask_kernel(SEED, RATE, OUT, L, BLOCK_L: tl.constexpr, ROUNDS: tl.constexpr):
        bh = tl.program_id(0)
        rows = tl.arange(0, BLOCK_L)
        kept = _keep_bits(tl.load(SEED), bh, rows, tl.load(RATE), BLOCK_L, ROUNDS)
        ok = (rows < L)[:, None] & (rows < L)[None, :]
        tl.store(OUT + bh * L * L + rows[:, None] * L + rows[None, :], kept.to(tl.int8), mask=ok)


def _launch_args(qkv: torch.Tensor, keep: torch.Tensor, heads: int, dropout: bool) -> tuple:
    batch, length, width = qkv.shape
    hidden = width // 3
    head_dim = hidden // heads
    block = _block(length)
    # 4 warps at 64 positions: the fastest of 2, 4 and 8 for both kernels on an H100 (Triton's
    # autotuner picked it at the 130M and 430M shapes); not autotuned per process, which cost
    # each training process's first epoch seconds of benchmarking and a 256 MB scratch buffer
    meta = dict(H=hidden, D=head_dim, BLOCK_L=block, DROPOUT=dropout, ROUNDS=tiled_attention.ROUNDS,
                num_warps=4 if block <= 64 else 8)
    return (batch * heads,), length, keep.view(torch.int8), 1.0 / math.sqrt(head_dim), meta


@torch.library.custom_op("tuner::short_attention", mutates_args=())
def short_attention(qkv: torch.Tensor, keep: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, heads: int,
                    dropout: bool) -> torch.Tensor:
    """Attention of qkv [B, L, 3H] (Q, K, V side by side) over keys where keep [B, L] (bool) is
    True -> [B, L, H]. With `dropout`, the weights are dropped at the rate in `rate` (an fp32 0-d
    tensor, read by the kernels: a compiled graph does not depend on its value) with a mask drawn
    from `seed` (an int32 tensor of one element)."""
    grid, length, keep8, scale, meta = _launch_args(qkv, keep, heads, dropout)
    out = qkv.new_empty(qkv.shape[0], length, meta["H"])
    if out.numel():
        _attention_forward_kernel[grid](qkv, keep8, seed, rate, out, length, heads, qkv.stride(0), qkv.stride(1),
                                        keep8.stride(0), out.stride(0), out.stride(1), scale, **meta)
    return out


@short_attention.register_fake
def _short_attention_fake(qkv, keep, seed, rate, heads, dropout):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


@torch.library.custom_op("tuner::short_attention_backward", mutates_args=())
def short_attention_backward(grad: torch.Tensor, qkv: torch.Tensor, keep: torch.Tensor, seed: torch.Tensor,
                             rate: torch.Tensor, heads: int, dropout: bool) -> torch.Tensor:
    """d loss / d qkv [B, L, 3H] from d loss / d out [B, L, H]."""
    grid, length, keep8, scale, meta = _launch_args(qkv, keep, heads, dropout)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if dqkv.numel():
        _attention_backward_kernel[grid](qkv, keep8, seed, rate, grad, dqkv, length, heads, qkv.stride(0),
                                         qkv.stride(1), keep8.stride(0), grad.stride(0), grad.stride(1),
                                         dqkv.stride(0), dqkv.stride(1), scale, **meta)
    return dqkv


@short_attention_backward.register_fake
def _short_attention_backward_fake(grad, qkv, keep, seed, rate, heads, dropout):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _setup_context(ctx, inputs, output):
    qkv, keep, seed, rate, heads, dropout = inputs
    ctx.save_for_backward(qkv, keep, seed, rate)
    ctx.heads, ctx.dropout = heads, dropout


def _backward(ctx, grad):
    qkv, keep, seed, rate = ctx.saved_tensors
    return (short_attention_backward(grad.contiguous(), qkv, keep, seed, rate, ctx.heads, ctx.dropout),
            None, None, None, None, None)


short_attention.register_autograd(_backward, setup_context=_setup_context)


def attend(qkv: torch.Tensor, keep: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, heads: int,
           dropout: bool) -> torch.Tensor:
    """`short_attention`'s contract at any length `usable` takes: its one-program kernels up to
    `SHORT_LENGTH` positions, `tiled_attention`'s beyond."""
    if qkv.shape[1] <= SHORT_LENGTH:
        return short_attention(qkv, keep, seed, rate, heads, dropout)
    return tiled_attention.tiled_attention(qkv, keep, seed, rate, heads, dropout)[0]


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed on `device`, drawn from torch's generator (so `torch.manual_seed`
    repeats it, and CUDA graphs replay a new one each step)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int32)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, length: int, dropout_p: float) -> torch.Tensor:
    """The dropout mask that `attend`'s kernels draw for `seed` at rate `dropout_p` (past
    `SHORT_LENGTH` positions, `tiled_attention`'s): bool [B, heads, L, L], True where a weight is kept."""
    if length > SHORT_LENGTH:
        return tiled_attention.keep_mask(seed, batch, heads, length, dropout_p)
    out = torch.empty(batch * heads, length, length, dtype=torch.int8, device=seed.device)
    rate = torch.full((), dropout_p, dtype=torch.float32, device=seed.device)
    _attention_mask_kernel[(batch * heads,)](seed, rate, out, length, BLOCK_L=_block(length),
                                             ROUNDS=tiled_attention.ROUNDS)
    return out.view(batch, heads, length, length).bool()
