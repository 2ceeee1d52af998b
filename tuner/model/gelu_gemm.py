"""The feed-forward's GELU inside its GEMMs' epilogues (CUDA, bf16/fp16; Triton).

A block's feed-forward is `down(GELU(up(x)))`. Under PyTorch and inductor the [rows, ffn]
activation makes two extra trips through memory each way: cuBLAS writes `up(x)`, an elementwise
kernel reads it and writes its GELU; in the backward cuBLAS writes the gradient of the GELU's
output, a kernel reads it with `up(x)` and writes the gradient of `up(x)`, and a reduction reads
that again for the bias gradient. Here two Triton GEMMs do the elementwise work in their
epilogues, while the tile is still in registers:

- `linear_gelu(x, w, b)` -> (pre, act): pre = x w^T + b rounded to x's dtype, act = GELU(pre)
  (exact, erf), from the rounded pre, as `F.gelu(F.linear(x, w, b))` computes it.
- `matmul_gelu_backward(grad, w2, pre)` -> (grad_pre, grad_bias): grad_pre = (grad w2) * GELU'(pre),
  the product rounded to grad's dtype first, as PyTorch's `gelu_backward` takes it; each program
  also sums its rows of grad_pre, so the bias gradient costs a [programs, ffn] sum instead of a
  pass over [rows, ffn].

Tiles are fixed per shape (`SETTINGS`, from `benchmarks/gelu_gemm.py`), not autotuned per process.
`reference` and `reference_backward` are the PyTorch computations the tests compare against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tuner.model import short_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model keeps PyTorch's ops
    triton = None

# tiles (BLOCK_M, BLOCK_N, BLOCK_K rows, columns and inner dimension per step; GROUP_M row blocks
# that share columns in L2; software pipeline stages; warps)
DEFAULT = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=8)
FORWARD = BACKWARD = DEFAULT
INTERPRETED = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_stages=1, num_warps=1)

EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_GELU_GRAD = 0, 1, 2

if triton is not None:

    @triton.jit
    def _gemm_kernel(A, B, BIAS, PRE, OUT, PARTS, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """OUT = epilogue(A @ B) for A [M, K], B [K, N] (any strides), K a multiple of BLOCK_K.
        EPILOGUE_NONE: OUT = A @ B (+ BIAS); EPILOGUE_GELU: PRE = A @ B + BIAS, OUT = GELU(PRE);
        EPILOGUE_GELU_GRAD: OUT = (A @ B) * GELU'(PRE), PARTS[program row] = OUT's column sums."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n  # programs in a group of GROUP_M row blocks, which share B's columns in L2
        first_m = (pid // width) * GROUP_M
        group_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_m
        pid_n = (pid % width) // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # rows and columns past the edge read row/column 0 (wrapped) and are not stored: no load masks
        a_ptrs = A + (rows % M).to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
        b_ptrs = B + ks[:, None] * stride_bk + (cols % N).to(tl.int64)[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K // BLOCK_K):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        inside = (rows < M)[:, None] & (cols < N)[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out = acc.to(OUT.dtype.element_ty)
        if EPILOGUE == 1:
            tl.store(PRE + offsets, out, mask=inside)
            x = out.to(tl.float32)
            out = (0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))).to(OUT.dtype.element_ty)
        elif EPILOGUE == 2:
            x = tl.load(PRE + offsets, mask=inside, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
            out = (out.to(tl.float32) * (cdf + x * pdf)).to(OUT.dtype.element_ty)
            kept = tl.where(inside, out.to(tl.float32), 0.0)
            tl.store(PARTS + pid_m.to(tl.int64) * N + cols, tl.sum(kept, axis=0), mask=cols < N)
        tl.store(OUT + offsets, out, mask=inside)


def _launch(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], pre: Optional[torch.Tensor],
            epilogue: int, setting: Optional[dict] = None) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(out, pre or None, parts or an empty tensor) of `_gemm_kernel` over a [M, K] @ b [K, N]."""
    setting = dict(setting or DEFAULT)
    m, k = a.shape
    n = b.shape[1]
    if k % setting["BLOCK_K"]:
        raise ValueError(f"the inner dimension {k} is not a multiple of BLOCK_K={setting['BLOCK_K']}")
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if epilogue == EPILOGUE_GELU:
        pre = torch.empty_like(out)
    grid_m = triton.cdiv(m, setting["BLOCK_M"])
    parts = torch.empty(grid_m if epilogue == EPILOGUE_GELU_GRAD else 0, n, device=a.device, dtype=torch.float32)
    grid = (grid_m * triton.cdiv(n, setting["BLOCK_N"]),)
    _gemm_kernel[grid](a, b, bias if bias is not None else out, pre if pre is not None else out, out,
                       parts, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                       EPILOGUE=epilogue, HAS_BIAS=bias is not None, **setting)
    return out, pre, parts


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                setting: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, act) for x [M, K], weight [N, K] (`nn.Linear`'s), bias [N]: pre = x weight^T + bias
    and act = GELU(pre), both in x's dtype."""
    out, pre, _ = _launch(x, weight.t(), bias, None, EPILOGUE_GELU, setting)
    return pre, out


def matmul_gelu_backward(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor,
                         setting: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_pre, grad_bias fp32) for grad [M, H] (of the down projection's output), weight [H, N]
    (the down projection's), pre [M, N]: grad_pre = (grad weight) * GELU'(pre)."""
    out, _, parts = _launch(grad, weight, None, pre, EPILOGUE_GELU_GRAD, setting)
    return out, parts.sum(0)


def matmul(a: torch.Tensor, b: torch.Tensor, setting: Optional[dict] = None) -> torch.Tensor:
    """a @ b on the same kernel with no epilogue (benchmarks: the kernel's GEMM against cuBLAS's)."""
    return _launch(a, b, None, None, EPILOGUE_NONE, setting)[0]


def usable(x: torch.Tensor, hidden: int) -> bool:
    """True where `feed_forward` takes rows of `hidden` columns: as `add_norm.usable` (sm80 or
    newer in fp16/bf16, or any float under the interpreter; off inside `portable()`), with
    `hidden` a multiple of the tiles' BLOCK_K (the GEMMs' inner dimension)."""
    if triton is None or not short_attention.enabled() or any(hidden % s["BLOCK_K"] for s in settings(hidden)):
        return False
    if short_attention.INTERPRETING:
        return True
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return x.is_cuda and dtype in (torch.float16, torch.bfloat16) and short_attention._ampere_or_newer(x.device.index)


def settings(hidden: int) -> tuple[dict, dict]:
    """(forward, backward) tiles for a feed-forward of `hidden` columns; small ones under the
    interpreter, which runs every lane in numpy."""
    if short_attention.INTERPRETING:
        return (INTERPRETED,) * 2
    return FORWARD, BACKWARD


@torch.library.custom_op("tuner::gelu_ffn", mutates_args=())
def gelu_ffn(x: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor,
             down_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pre, act) of the feed-forward without the down projection's bias, x [..., H]:
    pre = x up_weight^T + up_bias, act = GELU(pre) ([rows, F], kept for the backward), out = act
    down_weight^T [..., H]. All in x's dtype; the caller casts the weights to it."""
    hidden = x.shape[-1]
    pre, act = linear_gelu(x.reshape(-1, hidden).contiguous(), up_weight, up_bias, settings(hidden)[0])
    return (act @ down_weight.t()).view(x.shape), pre, act


@gelu_ffn.register_fake
def _gelu_ffn_fake(x, up_weight, up_bias, down_weight):
    pre = x.new_empty(x.numel() // x.shape[-1], up_weight.shape[0])
    return x.new_empty(x.shape), pre, torch.empty_like(pre)


@torch.library.custom_op("tuner::gelu_ffn_backward", mutates_args=())
def gelu_ffn_backward(grad: torch.Tensor, x: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
                      pre: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """(d x, d up_weight, d up_bias, d down_weight) of `gelu_ffn`'s out, from d out `grad`."""
    hidden = x.shape[-1]
    x2, grad2 = x.reshape(-1, hidden), grad.reshape(-1, hidden).contiguous()
    grad_pre, grad_bias = matmul_gelu_backward(grad2, down_weight, pre, settings(hidden)[1])
    return ((grad_pre @ up_weight).view(x.shape), grad_pre.t() @ x2, grad_bias.to(up_weight.dtype),
            grad2.t() @ act)


@gelu_ffn_backward.register_fake
def _gelu_ffn_backward_fake(grad, x, up_weight, down_weight, pre, act):
    return (torch.empty_like(x), torch.empty_like(up_weight), up_weight.new_empty(up_weight.shape[0]),
            torch.empty_like(down_weight))


def _setup_context(ctx, inputs, output):
    x, up_weight, _, down_weight = inputs
    _, pre, act = output
    ctx.save_for_backward(x, up_weight, down_weight, pre, act)
    ctx.mark_non_differentiable(pre, act)


def _backward(ctx, grad, _grad_pre, _grad_act):
    return gelu_ffn_backward(grad.contiguous(), *ctx.saved_tensors)


gelu_ffn.register_autograd(_backward, setup_context=_setup_context)


def feed_forward(x: torch.Tensor, up: torch.nn.Linear, down: torch.nn.Linear) -> torch.Tensor:
    """down(GELU(up(x))) without down's bias, on the kernels (the caller checked `usable`); under
    autocast in its dtype, as `F.linear` would run, with gradients back in the weights' dtype."""
    dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    with torch.autocast("cuda", enabled=False):
        return gelu_ffn(x.to(dtype), up.weight.to(dtype), up.bias.to(dtype), down.weight.to(dtype))[0]


def reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    pre = F.linear(x, weight, bias)
    return pre, F.gelu(pre)


def reference_backward(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_pre = torch.ops.aten.gelu_backward(grad @ weight, pre)
    return grad_pre, grad_pre.float().sum(0)
