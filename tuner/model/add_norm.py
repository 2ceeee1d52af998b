"""Residual dropout, add and the next LayerNorm as one Triton pass each way (CUDA, bf16/fp16).

A pre-LN block ends every branch (attention, feed-forward) with `x + dropout(branch)`, and the
next thing to read that sum is a LayerNorm (the next block's, or the final one). Inductor fuses
the three into one kernel per place, 16 per 430M step each way, but two things cost it there
(`benchmarks/results/profile_430M_*`, H100):

- Dropout draws come from `tl.rand`, which runs a whole Philox call (10 rounds of 32-bit
  multiplies) per element and keeps one of its four outputs. Here `tl.randint4x` keeps all four,
  so a row takes a quarter of the calls (as `short_attention._keep_bits` does).
- The weight and bias gradients: inductor's layer-norm backward writes per-tile partial sums and
  then calls `aten.sum` twice and casts twice, four launches of about 18 us in all per LayerNorm,
  and the branch's last linear has its bias gradient summed by a reduction of its own. Here the
  linear runs without its bias, the forward adds it, and each backward program sums its rows'
  contributions to all three gradients in registers; one small kernel adds the programs' partials
  (deterministically: no atomics) and writes them in the weights' dtype.

`dropout_add_norm(x, branch, branch_bias, weight, bias, seed, rate, dropout, eps)` returns
`(s, y)`: s = x + dropout_p(branch + branch_bias), rounded to the stream's dtype (the next
residual), and y = LayerNorm(s) in the same dtype; mean and variance in fp32, from the rounded s,
as `nn.LayerNorm` on s would. The backward recomputes them and the dropout mask from s and the
seed, so nothing but s is kept. The kernels read p from the 0-d tensor `rate`, so trials of a
search that differ in dropout share one compiled graph (`tuner.model.rate_dropout`).
`torch.library` custom ops with their own autograd: `torch.compile` sees one opaque call each
way. Each call costs host time (Python, Triton's launcher), so the model uses them only where CUDA
graphs replay the step (`model.fused_add_norm=auto`): there the 430M step took 14.3 against 14.8
ms on an H100; under plain compile the 130M step took 15.3 against 10.9 ms
(benchmarks/results/gpu_throughput_add_norm_430M.json, gpu_throughput_host_130M.json; measured
when the kernels took p as a float argument).
`reference` is the same computation in PyTorch for a given mask (`keep_mask` gives the kernels'
mask), which the tests compare against under Triton's interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tuner.model import short_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `usable` is False and the model keeps PyTorch's ops
    triton = None

MAX_HIDDEN = 8192  # one program holds a row in registers


def usable(x: torch.Tensor) -> bool:
    """True where the kernels take the residual stream `x` [..., H]: as `short_attention.usable`
    (sm80 or newer in fp16/bf16, or any float under the interpreter; off inside `portable()`)."""
    if triton is None or not short_attention.enabled() or x.shape[-1] > MAX_HIDDEN:
        return False
    if short_attention.INTERPRETING:
        return True
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return x.is_cuda and dtype in (torch.float16, torch.bfloat16) and short_attention._ampere_or_newer(x.device.index)


def _quarter(hidden: int) -> int:
    """Columns per Philox call's lane: a row of BLOCK_H = 4 * quarter columns."""
    return max(4, 1 << (-(-hidden // 4) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _keep(seed, rows, p, QUARTER: tl.constexpr):
        """The dropout mask of `rows`, [len(rows), 4 * QUARTER]: True where an element is kept.
        Four draws per Philox call (a row's lane q gives columns 4q..4q+3, in `join`'s order)."""
        offsets = rows[:, None] * QUARTER + tl.arange(0, QUARTER)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, offsets)
        draws = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (rows.shape[0], 4 * QUARTER))
        return tl.uint_to_uniform_float(draws) >= p

    @triton.jit
    def _stats(s, inside, H, eps):
        """(s - mean, 1 / std) of each row of s [R, BLOCK_H] (fp32, zeros outside `inside`)."""
        mean = tl.sum(s, axis=1) / H
        centred = tl.where(inside, s - mean[:, None], 0.0)
        return centred, 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / H + eps)

    @triton.jit
    def _add_norm_forward_kernel(X, BR, BB, W, B, SEED, RATE, S, Y, N, H, eps, QUARTER: tl.constexpr,
                                 BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr, HAS_BB: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, 4 * QUARTER)
        inside = (rows < N)[:, None] & (cols < H)[None, :]
        offsets = rows[:, None] * H + cols[None, :]
        x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
        branch = tl.load(BR + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_BB:  # the branch's own bias (its last linear's), added here instead of in the GEMM
            branch += tl.load(BB + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        if DROPOUT:
            p = tl.load(RATE)
            branch = tl.where(_keep(tl.load(SEED), rows, p, QUARTER), branch / (1.0 - p), 0.0)
        s = (x + branch).to(S.dtype.element_ty)
        tl.store(S + offsets, s, mask=inside)
        centred, rstd = _stats(s.to(tl.float32), inside, H, eps)
        w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < H, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _add_norm_backward_kernel(S, W, SEED, RATE, DY, DS, DX, DBR, PARTS, N, H, iters, eps, QUARTER: tl.constexpr,
                                  BLOCK_R: tl.constexpr, STAGES: tl.constexpr, DROPOUT: tl.constexpr,
                                  HAS_DS: tl.constexpr, HAS_BB: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, 4 * QUARTER)
        w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
        dw = tl.zeros([4 * QUARTER], tl.float32)
        db = tl.zeros([4 * QUARTER], tl.float32)
        dbb = tl.zeros([4 * QUARTER], tl.float32)
        seed = tl.load(SEED)
        p = tl.load(RATE)
        for i in tl.range(0, iters, num_stages=STAGES):  # STAGES > 1: the next rows' loads overlap this one's math
            rows = (pid * iters + i).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
            inside = (rows < N)[:, None] & (cols < H)[None, :]
            offsets = rows[:, None] * H + cols[None, :]
            s = tl.load(S + offsets, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + offsets, mask=inside, other=0.0).to(tl.float32)
            centred, rstd = _stats(s, inside, H, eps)
            normed = centred * rstd[:, None]
            dw += tl.sum(dy * normed, axis=0)
            db += tl.sum(dy, axis=0)
            g = dy * w[None, :]
            ds = rstd[:, None] * (g - (tl.sum(g, axis=1) / H)[:, None]
                                  - normed * (tl.sum(g * normed, axis=1) / H)[:, None])
            if HAS_DS:
                ds += tl.load(DS + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(DX + offsets, ds.to(DX.dtype.element_ty), mask=inside)
            if DROPOUT:
                ds = tl.where(_keep(seed, rows, p, QUARTER), ds / (1.0 - p), 0.0)
            tl.store(DBR + offsets, ds.to(DBR.dtype.element_ty), mask=inside)
            if HAS_BB:
                dbb += tl.sum(ds, axis=0)
        # PARTS [2 or 3, programs, H]: this program's sums for the weight, the bias, the branch's bias
        programs = tl.num_programs(0)
        tl.store(PARTS + pid * H + cols, dw, mask=cols < H)
        tl.store(PARTS + (programs + pid) * H + cols, db, mask=cols < H)
        if HAS_BB:
            tl.store(PARTS + (2 * programs + pid) * H + cols, dbb, mask=cols < H)

    @triton.jit
    def _sum_parts_kernel(PARTS, OUT, programs, H, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """OUT[k] = PARTS[k].sum(0) in OUT's dtype, for PARTS [K, programs, H]; program (c, k):
        columns block c of sum k."""
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        k = tl.program_id(1)
        inside = cols < H
        total = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, programs, BLOCK_P):
            parts = start + tl.arange(0, BLOCK_P)
            ok = (parts < programs)[:, None] & inside[None, :]
            total += tl.sum(tl.load(PARTS + (k * programs + parts[:, None]) * H + cols[None, :], mask=ok, other=0.0),
                            axis=0)
        tl.store(OUT + k * H + cols, total.to(OUT.dtype.element_ty), mask=inside)

    @triton.jit
    def _mask_kernel(SEED, RATE, OUT, H, QUARTER: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
        cols = tl.arange(0, 4 * QUARTER)
        kept = _keep(tl.load(SEED), rows, tl.load(RATE), QUARTER)
        tl.store(OUT + rows[:, None] * H + cols[None, :], kept.to(tl.int8), mask=(cols < H)[None, :])


# launch settings on a GPU (benchmarks/add_norm_kernels.py times the alternatives): rows per
# program (forward), rows per iteration and rows per program (backward, whose programs each sum
# their rows' weight gradients), warps
# (H100, results/add_norm_kernels_first_sweep.json: forward + backward 57.8 us with STAGES=3 against
# 66.8 with 1 at the 430M shape; 54.3 us with 2 warps against 84.1 with 4 at the 130M shape's 384
# columns, hence the cap below; results/add_norm_kernels.json, with the branch bias: these
# settings within 1 us of the fastest timed at both shapes)
FORWARD = dict(BLOCK_R=4, num_warps=4)
BACKWARD = dict(BLOCK_R=4, ROWS_PER_PROGRAM=32, num_warps=4, STAGES=3)
# the partial sums' reduction: one program per SUM_COLUMNS columns, SUM_PARTS partials at a time
SUM_COLUMNS, SUM_PARTS = 16, 64


def launch_settings(hidden: int) -> tuple[dict, dict]:
    """(forward, backward) launch settings for rows of `hidden` columns, as the kernels get them:
    `FORWARD` and `BACKWARD` with warps scaled down for narrow rows (at most one per 128 columns
    forward, one per 256 backward); small ones under the interpreter, which runs every lane in
    numpy."""
    if short_attention.INTERPRETING:
        return dict(BLOCK_R=2, num_warps=1), dict(BLOCK_R=2, ROWS_PER_PROGRAM=4, num_warps=1, STAGES=1)
    width = 4 * _quarter(hidden)
    return ({**FORWARD, "num_warps": max(1, min(FORWARD["num_warps"], width // 128))},
            {**BACKWARD, "num_warps": max(1, min(BACKWARD["num_warps"], width // 256))})


def _stream_dtype(x: torch.Tensor, branch: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, branch.dtype)


@torch.library.custom_op("tuner::dropout_add_norm", mutates_args=())
def dropout_add_norm(x: torch.Tensor, branch: torch.Tensor, branch_bias: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, dropout: bool,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + dropout_p(branch + branch_bias) (mask from `seed`, an int32 tensor of one
    element; `branch_bias` [H] or None) in the wider of x's and branch's dtypes, y =
    layer_norm(s, weight, bias, eps) in the same dtype. x, branch: [..., H]. The rate p is the
    fp32 0-d tensor `rate`, read by the kernels, so a compiled graph does not depend on its value
    (`tuner.model.rate_dropout`); `dropout` says whether p > 0."""
    hidden = x.shape[-1]
    x2, b2 = x.reshape(-1, hidden).contiguous(), branch.reshape(-1, hidden).contiguous()
    s = torch.empty(x2.shape, dtype=_stream_dtype(x, branch), device=x.device)
    y = torch.empty_like(s)
    if s.numel():
        tile = launch_settings(hidden)[0]
        _add_norm_forward_kernel[(triton.cdiv(s.shape[0], tile["BLOCK_R"]),)](
            x2, b2, branch_bias if branch_bias is not None else weight, weight, bias, seed, rate, s, y, s.shape[0],
            hidden, eps, QUARTER=_quarter(hidden), DROPOUT=dropout, HAS_BB=branch_bias is not None, **tile)
    return s.view(x.shape), y.view(x.shape)


@dropout_add_norm.register_fake
def _dropout_add_norm_fake(x, branch, branch_bias, weight, bias, seed, rate, dropout, eps):
    s = x.new_empty(x.shape, dtype=_stream_dtype(x, branch))
    return s, torch.empty_like(s)


@torch.library.custom_op("tuner::dropout_add_norm_backward", mutates_args=())
def dropout_add_norm_backward(grad_y: torch.Tensor, grad_s: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                              seed: torch.Tensor, rate: torch.Tensor, dropout: bool, eps: float, has_grad_s: bool,
                              has_branch_bias: bool, x_dtype: torch.dtype,
                              branch_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d branch, sums) from d y and d s (ignored where `has_grad_s` is False); sums [K, H]
    in the weight's dtype: d weight, d bias and, with `has_branch_bias`, d branch_bias."""
    hidden = s.shape[-1]
    s2, dy = s.reshape(-1, hidden), grad_y.reshape(-1, hidden).contiguous()
    ds = grad_s.reshape(-1, hidden).contiguous() if has_grad_s else dy
    rows = s2.shape[0]
    dx = torch.empty(s2.shape, dtype=x_dtype, device=s.device)
    dbranch = torch.empty(s2.shape, dtype=branch_dtype, device=s.device)
    kinds = 3 if has_branch_bias else 2
    sums = torch.empty(kinds, hidden, dtype=weight.dtype, device=s.device)
    tile = dict(launch_settings(hidden)[1])
    per_program = tile.pop("ROWS_PER_PROGRAM")
    iters = max(1, per_program // tile["BLOCK_R"])
    programs = max(1, triton.cdiv(rows, iters * tile["BLOCK_R"]))
    parts = torch.empty(kinds, programs, hidden, dtype=torch.float32, device=s.device)
    if rows:
        _add_norm_backward_kernel[(programs,)](s2, weight, seed, rate, dy, ds, dx, dbranch, parts, rows, hidden,
                                               iters, eps, QUARTER=_quarter(hidden), DROPOUT=dropout,
                                               HAS_DS=has_grad_s, HAS_BB=has_branch_bias, **tile)
    else:
        parts.zero_()
    _sum_parts_kernel[(triton.cdiv(hidden, SUM_COLUMNS), kinds)](parts, sums, programs, hidden, BLOCK_P=SUM_PARTS,
                                                                 BLOCK_C=SUM_COLUMNS, num_warps=4)
    return dx.view(s.shape), dbranch.view(s.shape), sums


@dropout_add_norm_backward.register_fake
def _dropout_add_norm_backward_fake(grad_y, grad_s, s, weight, seed, rate, dropout, eps, has_grad_s, has_branch_bias,
                                    x_dtype, branch_dtype):
    kinds = 3 if has_branch_bias else 2
    return (s.new_empty(s.shape, dtype=x_dtype), s.new_empty(s.shape, dtype=branch_dtype),
            weight.new_empty(kinds, s.shape[-1]))


def _setup_context(ctx, inputs, output):
    x, branch, branch_bias, weight, bias, seed, rate, dropout, eps = inputs
    ctx.save_for_backward(output[0], weight, seed, rate)
    ctx.dropout, ctx.eps = dropout, eps
    ctx.dtypes = (x.dtype, branch.dtype, bias.dtype, None if branch_bias is None else branch_bias.dtype)


def _backward(ctx, grad_s, grad_y):
    s, weight, seed, rate = ctx.saved_tensors
    x_dtype, branch_dtype, bias_dtype, branch_bias_dtype = ctx.dtypes
    has_grad_s, has_bb = grad_s is not None, branch_bias_dtype is not None
    grad_y = grad_y if grad_y is not None else torch.zeros_like(s)
    dx, dbranch, sums = dropout_add_norm_backward(grad_y, grad_s if has_grad_s else grad_y, s, weight, seed, rate,
                                                  ctx.dropout, ctx.eps, has_grad_s, has_bb, x_dtype, branch_dtype)
    dbb = sums[2].to(branch_bias_dtype) if has_bb else None
    return dx, dbranch, dbb, sums[0], sums[1].to(bias_dtype), None, None, None, None


dropout_add_norm.register_autograd(_backward, setup_context=_setup_context)


def add_norm(x: torch.Tensor, branch: torch.Tensor, norm: torch.nn.LayerNorm, p: float, rate: torch.Tensor,
             branch_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + dropout_p(branch + branch_bias), norm of that) on the kernels; the caller checked
    `usable(x)`. Under autocast the branch is already in autocast's dtype (a linear's output).
    `p`: the rate, 0 for none (eval); `rate`: the dropout's rate as an fp32 0-d tensor on x's
    device (a `RateDropout`'s buffer, so a compiled graph does not depend on it), which the kernels
    read only where p > 0."""
    seed = short_attention.new_seed(x.device) if p > 0 else torch.zeros(1, dtype=torch.int32, device=x.device)
    return dropout_add_norm(x, branch, branch_bias, norm.weight, norm.bias, seed, rate, p > 0, norm.eps)


def keep_mask(seed: torch.Tensor, rows: int, hidden: int, p: float) -> torch.Tensor:
    """The kernels' dropout mask for `seed`: bool [rows, hidden], True where an element is kept."""
    out = torch.empty(rows, hidden, dtype=torch.int8, device=seed.device)
    rate = torch.full((), p, dtype=torch.float32, device=seed.device)
    _mask_kernel[(rows,)](seed, rate, out, hidden, QUARTER=_quarter(hidden))
    return out.bool()


def reference(x: torch.Tensor, branch: torch.Tensor, branch_bias: Optional[torch.Tensor], weight: torch.Tensor,
              bias: torch.Tensor, keep: torch.Tensor, p: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`dropout_add_norm` in PyTorch with the mask `keep` (bool, x's shape): the tests' yardstick."""
    dtype = _stream_dtype(x, branch)
    full = branch.float() + (branch_bias.float() if branch_bias is not None else 0.0)
    dropped = torch.where(keep, full / (1 - p), 0.0) if p > 0 else full
    s = (x.float() + dropped).to(dtype)
    y = F.layer_norm(s.float(), s.shape[-1:], weight.float(), bias.float(), eps).to(dtype)
    return s, y
