"""Residual dropout, add and the next LayerNorm as one Triton pass each way (CUDA, bf16/fp16).

A pre-LN block ends every branch (attention, feed-forward) with `x + dropout(branch)`, and the
next thing to read that sum is a LayerNorm (the next block's, or the final one). Inductor fuses
the three into one kernel per place, 16 per 430M step each way, but two things cost it there
(`benchmarks/results/profile_430M_*`, H100):

- Dropout draws come from `tl.rand`, which runs a whole Philox call (10 rounds of 32-bit
  multiplies) per element and keeps one of its four outputs. Here `tl.randint4x` keeps all four,
  so a row takes a quarter of the calls (as `short_attention._keep_bits` does).
- The weight and bias gradients: inductor's layer-norm backward writes per-tile partial sums and
  then calls `aten.sum` twice and casts twice, four launches of about 18 us in all per LayerNorm.
  Here each backward program sums its rows' contributions in registers, and one small kernel
  sums the programs' partials and writes both gradients in the weights' dtype.

`dropout_add_norm(x, branch, weight, bias, seed, p, eps)` returns `(s, y)`: s = x +
dropout_p(branch), rounded to the stream's dtype (the next residual), and y = LayerNorm(s) in
the same dtype; mean and variance in fp32, from the rounded s, as `nn.LayerNorm` on s would. The
backward recomputes them and the dropout mask from s and the seed, so nothing but s is kept.
`torch.library` custom ops with their own autograd: `torch.compile` (CUDA graphs included) sees
one opaque call each way. `reference` is the same computation in PyTorch for a given mask
(`keep_mask` gives the kernels' mask), which the tests compare against under Triton's
interpreter.
"""

from __future__ import annotations

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
    def _forward_kernel(X, BR, W, B, SEED, S, Y, N, H, eps, p, QUARTER: tl.constexpr, BLOCK_R: tl.constexpr,
                        DROPOUT: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, 4 * QUARTER)
        inside = (rows < N)[:, None] & (cols < H)[None, :]
        offsets = rows[:, None] * H + cols[None, :]
        x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
        branch = tl.load(BR + offsets, mask=inside, other=0.0).to(tl.float32)
        if DROPOUT:
            branch = tl.where(_keep(tl.load(SEED), rows, p, QUARTER), branch / (1.0 - p), 0.0)
        s = (x + branch).to(S.dtype.element_ty)
        tl.store(S + offsets, s, mask=inside)
        centred, rstd = _stats(s.to(tl.float32), inside, H, eps)
        w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < H, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _backward_kernel(S, W, SEED, DY, DS, DX, DBR, PART_W, PART_B, N, H, iters, eps, p, QUARTER: tl.constexpr,
                         BLOCK_R: tl.constexpr, STAGES: tl.constexpr, DROPOUT: tl.constexpr, HAS_DS: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, 4 * QUARTER)
        w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
        dw = tl.zeros([4 * QUARTER], tl.float32)
        db = tl.zeros([4 * QUARTER], tl.float32)
        seed = tl.load(SEED)
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
        tl.store(PART_W + pid * H + cols, dw, mask=cols < H)
        tl.store(PART_B + pid * H + cols, db, mask=cols < H)

    @triton.jit
    def _sum_parts_kernel(PART_W, PART_B, DW, DB, programs, H, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = cols < H
        dw = tl.zeros([BLOCK_C], tl.float32)
        db = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, programs, BLOCK_P):
            parts = start + tl.arange(0, BLOCK_P)
            ok = (parts < programs)[:, None] & inside[None, :]
            offsets = parts[:, None] * H + cols[None, :]
            dw += tl.sum(tl.load(PART_W + offsets, mask=ok, other=0.0), axis=0)
            db += tl.sum(tl.load(PART_B + offsets, mask=ok, other=0.0), axis=0)
        tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=inside)
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=inside)

    @triton.jit
    def _mask_kernel(SEED, OUT, N, H, p, QUARTER: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
        cols = tl.arange(0, 4 * QUARTER)
        kept = _keep(tl.load(SEED), rows, p, QUARTER)
        tl.store(OUT + rows[:, None] * H + cols[None, :], kept.to(tl.int8), mask=(cols < H)[None, :])


# launch settings on a GPU (benchmarks/add_norm_kernels.py times the alternatives): rows per
# program (forward), rows per iteration and rows per program (backward, whose programs each sum
# their rows' weight gradients), warps
FORWARD = dict(BLOCK_R=4, num_warps=4)
BACKWARD = dict(BLOCK_R=4, ROWS_PER_PROGRAM=32, num_warps=4, STAGES=1)
# the partial sums' reduction: one program per SUM_COLUMNS columns, SUM_PARTS partials at a time
SUM_COLUMNS, SUM_PARTS = 16, 64


def _settings(hidden: int) -> tuple[dict, dict]:
    """(forward, backward) launch settings; small ones under the interpreter, which runs every
    lane in numpy. Warps scale down for narrow rows (a 32-wide row has 32 elements for them)."""
    if short_attention.INTERPRETING:
        return dict(BLOCK_R=2, num_warps=1), dict(BLOCK_R=2, ROWS_PER_PROGRAM=4, num_warps=1, STAGES=1)
    cap = max(1, min(8, 4 * _quarter(hidden) // 128))
    return ({**FORWARD, "num_warps": min(FORWARD["num_warps"], cap)},
            {**BACKWARD, "num_warps": min(BACKWARD["num_warps"], cap)})


def _stream_dtype(x: torch.Tensor, branch: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, branch.dtype)


@torch.library.custom_op("tuner::dropout_add_norm", mutates_args=())
def dropout_add_norm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     seed: torch.Tensor, p: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + dropout_p(branch) (mask from `seed`, an int32 tensor of one element) in the
    wider of the two dtypes, y = layer_norm(s, weight, bias, eps) in the same dtype. x, branch:
    [..., H]."""
    hidden = x.shape[-1]
    x2, b2 = x.reshape(-1, hidden).contiguous(), branch.reshape(-1, hidden).contiguous()
    s = torch.empty(x2.shape, dtype=_stream_dtype(x, branch), device=x.device)
    y = torch.empty_like(s)
    if s.numel():
        tile = _settings(hidden)[0]
        _forward_kernel[(triton.cdiv(s.shape[0], tile["BLOCK_R"]),)](x2, b2, weight, bias, seed, s, y, s.shape[0], hidden,
                                                                     eps, p, QUARTER=_quarter(hidden), DROPOUT=p > 0,
                                                                     **tile)
    return s.view(x.shape), y.view(x.shape)


@dropout_add_norm.register_fake
def _dropout_add_norm_fake(x, branch, weight, bias, seed, p, eps):
    s = x.new_empty(x.shape, dtype=_stream_dtype(x, branch))
    return s, torch.empty_like(s)


@torch.library.custom_op("tuner::dropout_add_norm_backward", mutates_args=())
def dropout_add_norm_backward(grad_y: torch.Tensor, grad_s: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                              seed: torch.Tensor, p: float, eps: float, has_grad_s: bool, x_dtype: torch.dtype,
                              branch_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d branch, d weight, d bias) from d y and d s (ignored where `has_grad_s` is False)."""
    hidden = s.shape[-1]
    s2, dy = s.reshape(-1, hidden), grad_y.reshape(-1, hidden).contiguous()
    ds = grad_s.reshape(-1, hidden).contiguous() if has_grad_s else dy
    rows = s2.shape[0]
    dx = torch.empty(s2.shape, dtype=x_dtype, device=s.device)
    dbranch = torch.empty(s2.shape, dtype=branch_dtype, device=s.device)
    dw, db = torch.empty_like(weight), torch.empty_like(weight)
    tile = dict(_settings(hidden)[1])
    per_program = tile.pop("ROWS_PER_PROGRAM")
    iters = max(1, per_program // tile["BLOCK_R"])
    programs = max(1, triton.cdiv(rows, iters * tile["BLOCK_R"]))
    parts = torch.empty(2, programs, hidden, dtype=torch.float32, device=s.device)
    if rows:
        _backward_kernel[(programs,)](s2, weight, seed, dy, ds, dx, dbranch, parts[0], parts[1], rows, hidden, iters,
                                      eps, p, QUARTER=_quarter(hidden), DROPOUT=p > 0, HAS_DS=has_grad_s, **tile)
    else:
        parts.zero_()
    _sum_parts_kernel[(triton.cdiv(hidden, SUM_COLUMNS),)](parts[0], parts[1], dw, db, programs, hidden,
                                                           BLOCK_P=SUM_PARTS, BLOCK_C=SUM_COLUMNS, num_warps=4)
    return dx.view(s.shape), dbranch.view(s.shape), dw, db


@dropout_add_norm_backward.register_fake
def _dropout_add_norm_backward_fake(grad_y, grad_s, s, weight, seed, p, eps, has_grad_s, x_dtype, branch_dtype):
    return (s.new_empty(s.shape, dtype=x_dtype), s.new_empty(s.shape, dtype=branch_dtype), torch.empty_like(weight),
            torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, branch, weight, bias, seed, p, eps = inputs
    ctx.save_for_backward(output[0], weight, seed)
    ctx.p, ctx.eps, ctx.dtypes = p, eps, (x.dtype, branch.dtype, bias.dtype)


def _backward(ctx, grad_s, grad_y):
    s, weight, seed = ctx.saved_tensors
    x_dtype, branch_dtype, bias_dtype = ctx.dtypes
    has_grad_s = grad_s is not None
    dx, dbranch, dw, db = dropout_add_norm_backward(grad_y, grad_s if has_grad_s else grad_y, s, weight, seed, ctx.p,
                                                    ctx.eps, has_grad_s, x_dtype, branch_dtype)
    return dx, dbranch, dw, db.to(bias_dtype), None, None, None


dropout_add_norm.register_autograd(_backward, setup_context=_setup_context)


def add_norm(x: torch.Tensor, branch: torch.Tensor, norm: torch.nn.LayerNorm, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + dropout_p(branch), norm of that) on the kernels; the caller checked `usable(x)`.
    Under autocast the branch is already in autocast's dtype (a linear's output)."""
    seed = short_attention.new_seed(x.device) if p > 0 else torch.zeros(1, dtype=torch.int32, device=x.device)
    return dropout_add_norm(x, branch, norm.weight, norm.bias, seed, p, norm.eps)


def keep_mask(seed: torch.Tensor, rows: int, hidden: int, p: float) -> torch.Tensor:
    """The kernels' dropout mask for `seed`: bool [rows, hidden], True where an element is kept."""
    out = torch.empty(rows, hidden, dtype=torch.int8, device=seed.device)
    _mask_kernel[(rows,)](seed, out, rows, hidden, p, QUARTER=_quarter(hidden))
    return out.bool()


def reference(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor,
              p: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`dropout_add_norm` in PyTorch with the mask `keep` (bool, x's shape): the tests' yardstick."""
    dtype = _stream_dtype(x, branch)
    dropped = torch.where(keep, branch.float() / (1 - p), 0.0) if p > 0 else branch.float()
    s = (x.float() + dropped).to(dtype)
    y = F.layer_norm(s.float(), s.shape[-1:], weight.float(), bias.float(), eps).to(dtype)
    return s, y
