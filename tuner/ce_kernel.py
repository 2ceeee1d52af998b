"""Cross-entropy over materialised catalog logits on CUDA: two Triton passes over the logits.

`catalog_ce(logits, bias, target)` returns, per row of `logits` [N, V] (the head's GEMM output,
without its bias), lse(logits + bias) - (logits + bias)[target]. It is a `torch.library` custom op
with its own autograd formula: torch.compile sees one opaque call, and the head's GEMMs around it
stay cuBLAS's.

Why not inductor's code for the same expression (`tuner.losses._row_ce`, the reference on every
other device): in the 430M step on an H100 its forward took 0.31 ms and its backward 0.54 ms for
409 MB of bf16 logits, about half of the memory bandwidth. The log-sum-exp read the logits twice
(a max, then a sum), and the backward, which also sums the bias gradient over the rows, walked the
logits column block by column block. Here:

- Forward, `_ce_forward_kernel`: one program per row folds the row into a running max and sum of
  exponentials (the online softmax), one read of the logits, and picks the target's logit.
- The catalog width and row strides are compile-time constants: 159,752 columns is a multiple of
  8 but not of 16, so as a runtime argument Triton could not prove the rows 16-byte aligned and
  loaded the logits two bytes at a time (the first version: 0.59 ms for the backward pass).
- Backward, `_ce_backward_kernel`: one program per [BLOCK_N, BLOCK_V] tile writes d loss / d logits
  = g * (softmax - one_hot(target)) in the logits' dtype and the tile's column sums (fp32) to a
  [cdiv(N, BLOCK_N), V] buffer, whose sum over its few rows is the bias gradient. One read of
  the logits, one write of their gradient, row-major; no atomics, so the sums are deterministic.

Columns with a -inf bias (padding, the mask token, alignment columns) take no probability and no
gradient. The kernels also run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`),
which is how the tests check them against `_row_ce` without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `usable` is False and the PyTorch path is used
    triton = None


def usable(hidden: torch.Tensor) -> bool:
    """True where the kernels take the logits of `hidden`: CUDA in bf16/fp16 (autocast's dtype,
    else hidden's own), or any device under the interpreter."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if not hidden.is_cuda:
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    return dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit
    def _ce_forward_kernel(L, B, T, ROWS, LSE, V: tl.constexpr, stride_l: tl.constexpr, BLOCK: tl.constexpr,
                           PER_LANE: tl.constexpr):
        # base-2 exponentials (one multiply folds log2(e) in); PER_LANE keeps a running max and sum
        # per lane (two exponentials per logit, no reduction in the loop), else per row (one
        # exponential per logit, a max and a sum over the block in each iteration)
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        if PER_LANE:
            m = tl.full([BLOCK], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK], tl.float32)
        else:
            m = float("-inf")
            s = 0.0
        for start in range(0, V, BLOCK):
            cols = start + offs
            inside = cols < V
            x = tl.load(L + row * stride_l + cols, mask=inside, other=float("-inf")).to(tl.float32)
            x = (x + tl.load(B + cols, mask=inside, other=float("-inf")).to(tl.float32)) * LOG2E
            if PER_LANE:
                new = tl.maximum(m, x)
                safe = tl.where(new == float("-inf"), 0.0, new)  # a lane with nothing finite yet
                s = s * tl.exp2(m - safe) + tl.exp2(x - safe)
            else:
                new = tl.maximum(m, tl.max(x, axis=0))
                safe = tl.where(new == float("-inf"), 0.0, new)
                s = s * tl.exp2(m - safe) + tl.sum(tl.exp2(x - safe), axis=0)
            m = new
        if PER_LANE:
            top = tl.max(m, axis=0)
            total = tl.sum(s * tl.exp2(m - top), axis=0)
        else:
            top = m
            total = s
        lse = (top + tl.log2(total)) / LOG2E
        t = tl.load(T + row)
        target = tl.load(L + row * stride_l + t).to(tl.float32) + tl.load(B + t).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(ROWS + row, lse - target)

    @triton.jit
    def _ce_backward_kernel(L, B, T, LSE, G, D, PART, N, V: tl.constexpr, stride_l: tl.constexpr,
                            stride_d: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        pid_n, pid_v = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_in, col_in = rows < N, cols < V
        inside = row_in[:, None] & col_in[None, :]
        offsets = rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
        x = tl.load(L + offsets, mask=inside, other=0.0).to(tl.float32)
        x += tl.load(B + cols, mask=col_in, other=float("-inf")).to(tl.float32)[None, :]
        lse = tl.load(LSE + rows, mask=row_in, other=0.0)
        g = tl.load(G + rows, mask=row_in, other=0.0)
        t = tl.load(T + rows, mask=row_in, other=-1)
        p = tl.exp2((x - lse[:, None]) * 1.4426950408889634)
        d = g[:, None] * (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0))
        d = tl.where(inside, d, 0.0)
        tl.store(D + rows.to(tl.int64)[:, None] * stride_d + cols[None, :], d.to(D.dtype.element_ty), mask=inside)
        tl.store(PART + pid_n.to(tl.int64) * V + cols, tl.sum(d, axis=0), mask=col_in)


# launch settings on a GPU, the fastest that benchmarks/ce_kernel_tiles.py timed on an H100 at the
# 430M step's shape (results/ce_kernel_tiles.json): forward 0.21 ms against 0.28-0.30 with
# running sums per lane, backward 0.42 against 0.43-0.61 for other tiles
FORWARD = dict(BLOCK=8192, PER_LANE=False, num_warps=16)
BACKWARD = dict(BLOCK_N=64, BLOCK_V=256, num_warps=8)


def _settings() -> tuple[dict, dict]:
    """(forward, backward) launch settings; small blocks under the interpreter, which runs every
    lane in numpy."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (dict(BLOCK=64, PER_LANE=FORWARD["PER_LANE"], num_warps=4),
                dict(BLOCK_N=16, BLOCK_V=32, num_warps=4))
    return FORWARD, BACKWARD


# flexible_layout: inductor passes the logits in whatever layout the GEMM wrote (it pads the rows
# of a [1152, 159752] product); under its default stride constraint it copied them to the eager
# layout first, 368 MB each way per 430M step (0.55 ms on an H100)
@torch.library.custom_op("tuner::catalog_ce", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def catalog_ce(logits: torch.Tensor, bias: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, lse) of logits [N, V] + bias [V]: rows = lse - logit[target] (fp32), target int [N]
    in [0, V)."""
    logits = logits if logits.stride(1) == 1 else logits.contiguous()  # any row stride; columns dense
    n, v = logits.shape
    rows = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(rows)
    if n:
        _ce_forward_kernel[(n,)](logits, bias.contiguous(), target.to(torch.int32).contiguous(), rows, lse, v,
                                 logits.stride(0), **_settings()[0])
    return rows, lse


@catalog_ce.register_fake
def _catalog_ce_fake(logits, bias, target):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("tuner::catalog_ce_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def catalog_ce_backward(grad_rows: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d logits, d bias) of sum(grad_rows * rows)."""
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    n, v = logits.shape
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    tiles = _settings()[1]
    parts = torch.empty(triton.cdiv(n, tiles["BLOCK_N"]) if n else 0, v, device=logits.device, dtype=torch.float32)
    if n:
        grid = (triton.cdiv(n, tiles["BLOCK_N"]), triton.cdiv(v, tiles["BLOCK_V"]))
        _ce_backward_kernel[grid](logits, bias.contiguous(), target.to(torch.int32).contiguous(), lse,
                                  grad_rows.float().contiguous(), grad_logits, parts, n, v, logits.stride(0),
                                  grad_logits.stride(0), **tiles)
    return grad_logits, parts.sum(0).to(bias.dtype)


@catalog_ce_backward.register_fake
def _catalog_ce_backward_fake(grad_rows, logits, bias, target, lse):
    return torch.empty_like(logits, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    logits, bias, target = inputs
    ctx.save_for_backward(logits, bias, target, output[1])
    ctx.mark_non_differentiable(output[1])  # lse is returned for the backward's sake only


def _backward(ctx, grad_rows, grad_lse):
    logits, bias, target, lse = ctx.saved_tensors
    grad_rows = grad_rows if grad_rows is not None else torch.zeros_like(lse)
    grad_logits, grad_bias = catalog_ce_backward(grad_rows, logits, bias, target, lse)
    return grad_logits, grad_bias, None


catalog_ce.register_autograd(_backward, setup_context=_setup_context)
