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

- Forward, `_ce_forward_kernel`: each program folds a block of BLOCK_R rows, over every SPLIT-th
  column block, into a running max and sum of exponentials per row (the online softmax): one read
  of the logits. With SPLIT > 1, `_ce_combine_kernel` folds the SPLIT partial sums of each row
  and picks the target's logit. The defaults (two rows a program, each row block split 8 ways)
  launch 4x as many programs as rows; one program per row (1,344 in the 430M step) was slower
  (below).
- The catalog width and row strides are compile-time constants: 159,752 columns is a multiple of
  8 but not of 16, so as a runtime argument Triton could not prove the rows 16-byte aligned and
  loaded the logits two bytes at a time (the first version: 0.59 ms for the backward pass).
- Backward, `_ce_backward_kernel`: each program takes a block of BLOCK_N rows and every
  COLUMN_PROGRAMS-th column block of them; per [BLOCK_N, BLOCK_V] tile it writes d loss / d logits
  = g * (softmax - one_hot(target)) in the logits' dtype and the tile's column sums (fp32) to a
  [cdiv(N, BLOCK_N), V] buffer, whose sum over its rows is the bias gradient. One read of the
  logits, one write of their gradient, row-major; no atomics, so the sums are deterministic.
- Both passes loop, and STAGES > 1 pipelines the loop's loads (asynchronous copies to shared
  memory while the previous block is computed).

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
    def _ce_finish(L, B, T, ROWS, LSE, rows, row_in, top, total, stride_l: tl.constexpr):
        # a row block's lse from its running max and sum (base 2), and rows = lse - target logit
        lse = (top + tl.log2(total)) / 1.4426950408889634
        t = tl.load(T + rows, mask=row_in, other=0)
        target = tl.load(L + rows.to(tl.int64) * stride_l + t, mask=row_in, other=0.0).to(tl.float32)
        target += tl.load(B + t, mask=row_in, other=0.0).to(tl.float32)
        tl.store(LSE + rows, lse, mask=row_in)
        tl.store(ROWS + rows, lse - target, mask=row_in)

    @triton.jit
    def _ce_forward_kernel(L, B, T, ROWS, LSE, PART_M, PART_S, N, V: tl.constexpr, stride_l: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr):
        # program (i, j) folds BLOCK_R rows' column blocks j, j + SPLIT, ... into a running max and
        # sum of base-2 exponentials per row (one multiply folds log2(e) in): one read of the logits,
        # and one read of each bias block per BLOCK_R rows. SPLIT > 1: partial sums, which
        # _ce_combine_kernel folds
        LOG2E: tl.constexpr = 1.4426950408889634
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_in = rows < N
        split = tl.program_id(1)
        base = L + rows.to(tl.int64)[:, None] * stride_l
        offs = tl.arange(0, BLOCK)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for start in tl.range(split * BLOCK, V, SPLIT * BLOCK, num_stages=STAGES):
            cols = start + offs
            inside = cols < V
            x = tl.load(base + cols[None, :], mask=row_in[:, None] & inside[None, :],
                        other=float("-inf")).to(tl.float32)
            x = (x + tl.load(B + cols, mask=inside, other=float("-inf")).to(tl.float32)[None, :]) * LOG2E
            new = tl.maximum(m, tl.max(x, axis=1))
            safe = tl.where(new == float("-inf"), 0.0, new)  # a row with nothing finite yet
            s = s * tl.exp2(m - safe) + tl.sum(tl.exp2(x - safe[:, None]), axis=1)
            m = new
        if SPLIT == 1:
            _ce_finish(L, B, T, ROWS, LSE, rows, row_in, m, s, stride_l)
        else:
            tl.store(PART_M + rows * SPLIT + split, m, mask=row_in)
            tl.store(PART_S + rows * SPLIT + split, s, mask=row_in)

    @triton.jit
    def _ce_combine_kernel(L, B, T, ROWS, LSE, PART_M, PART_S, N, stride_l: tl.constexpr, SPLIT: tl.constexpr,
                           BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_in = rows < N
        at = rows[:, None] * SPLIT + tl.arange(0, SPLIT)[None, :]
        m = tl.load(PART_M + at, mask=row_in[:, None], other=float("-inf"))
        s = tl.load(PART_S + at, mask=row_in[:, None], other=0.0)
        top = tl.max(m, axis=1)
        safe = tl.where(top == float("-inf"), 0.0, top)
        _ce_finish(L, B, T, ROWS, LSE, rows, row_in, top, tl.sum(s * tl.exp2(m - safe[:, None]), axis=1), stride_l)

    @triton.jit
    def _ce_backward_kernel(L, B, T, LSE, G, D, PART, N, V: tl.constexpr, stride_l: tl.constexpr,
                            stride_d: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                            COLUMN_PROGRAMS: tl.constexpr, STAGES: tl.constexpr):
        # program (i, j) takes row block i's column blocks j, j + COLUMN_PROGRAMS, ...
        pid_n, pid_v = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_in = rows < N
        lse = tl.load(LSE + rows, mask=row_in, other=0.0)
        g = tl.load(G + rows, mask=row_in, other=0.0)
        t = tl.load(T + rows, mask=row_in, other=-1)
        source = L + rows.to(tl.int64)[:, None] * stride_l
        dest = D + rows.to(tl.int64)[:, None] * stride_d
        for start in tl.range(pid_v * BLOCK_V, V, COLUMN_PROGRAMS * BLOCK_V, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK_V)
            col_in = cols < V
            inside = row_in[:, None] & col_in[None, :]
            x = tl.load(source + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            x += tl.load(B + cols, mask=col_in, other=float("-inf")).to(tl.float32)[None, :]
            p = tl.exp2((x - lse[:, None]) * 1.4426950408889634)
            d = g[:, None] * (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0))
            d = tl.where(inside, d, 0.0)
            tl.store(dest + cols[None, :], d.to(D.dtype.element_ty), mask=inside)
            tl.store(PART + pid_n.to(tl.int64) * V + cols, tl.sum(d, axis=0), mask=col_in)


# launch settings on a GPU: the fastest that benchmarks/ce_kernel_tiles.py timed on an H200 at the
# 430M step's shape, in CUDA graphs (results/h200_session29/ce_kernel_tiles_graphs_b492995.json):
# forward 0.130 ms against 0.206 for session 14's one program per row (BLOCK_R=1, BLOCK=8192,
# SPLIT=1, STAGES=1, 16 warps), backward 0.304 against 0.499 for its one tile per program
# (BLOCK_N=64, BLOCK_V=256, COLUMN_PROGRAMS=0, STAGES=1, 8 warps). BLOCK_R: rows per forward
# program; SPLIT: forward programs per row block (a power of two); COLUMN_PROGRAMS: backward
# programs per row block (0: one per column block); STAGES: the loops' pipelining depth
FORWARD = dict(BLOCK_R=2, BLOCK=2048, SPLIT=8, STAGES=3, num_warps=4)
BACKWARD = dict(BLOCK_N=16, BLOCK_V=512, COLUMN_PROGRAMS=78, STAGES=3, num_warps=4)
COMBINE_ROWS = 64  # rows per _ce_combine_kernel program


def _settings() -> tuple[dict, dict]:
    """(forward, backward) launch settings; under the interpreter, which runs every lane in numpy,
    the same design with small blocks."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {**FORWARD, "BLOCK": 64, "num_warps": 4}, {**BACKWARD, "BLOCK_N": 16, "BLOCK_V": 32, "num_warps": 4}
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
        tile = dict(_settings()[0])
        split = tile["SPLIT"]
        parts = torch.empty(2, n * split if split > 1 else 0, device=logits.device, dtype=torch.float32)
        args = (logits, bias.contiguous(), target.to(torch.int32).contiguous(), rows, lse, parts[0], parts[1], n)
        _ce_forward_kernel[(triton.cdiv(n, tile["BLOCK_R"]), split)](*args, v, logits.stride(0), **tile)
        if split > 1:
            _ce_combine_kernel[(triton.cdiv(n, COMBINE_ROWS),)](*args, logits.stride(0), split, COMBINE_ROWS)
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
    tiles = dict(_settings()[1])
    parts = torch.empty(triton.cdiv(n, tiles["BLOCK_N"]) if n else 0, v, device=logits.device, dtype=torch.float32)
    if n:
        blocks = triton.cdiv(v, tiles["BLOCK_V"])
        tiles["COLUMN_PROGRAMS"] = min(tiles["COLUMN_PROGRAMS"] or blocks, blocks)
        grid = (triton.cdiv(n, tiles["BLOCK_N"]), tiles["COLUMN_PROGRAMS"])
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
