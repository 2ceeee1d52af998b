"""Tried and not kept (session 31): the feed-forward's GELU in the epilogues of Triton GEMMs,
against what the compiled step runs for the same work (cuBLAS, then inductor's elementwise
kernels), at a size's feed-forward shape (rows = batch x 50 positions).

A block's feed-forward is `down(GELU(up(x)))`. Under inductor the [rows, ffn] activation makes
extra trips through memory: cuBLAS writes up(x), a kernel reads it and writes its GELU; in the
backward cuBLAS writes the gradient of the GELU's output, a kernel reads it with up(x) and writes
the gradient of up(x), and a reduction sums that for the bias gradient. Here one Triton GEMM does
the elementwise work in its epilogue each way, while the tile is in registers:

- forward, `linear_gelu` -> (pre, act): pre = x w^T + b rounded to bf16, act = GELU(pre) (exact,
  erf), against `F.gelu(F.linear(x, w, b))` compiled (both return pre and act);
- backward, `matmul_gelu_backward` -> (grad_pre, grad_bias): (grad w2) rounded, times GELU'(pre),
  with each program's column sums for the bias gradient, against `gelu_backward(grad @ w2, pre)`
  and its column sum, compiled;
- `matmul`: the same kernel with no epilogue against cuBLAS's GEMM alone, so a slower tile shows
  whether the GEMM or the epilogue lost.

GPU time per call in a CUDA graph (`gpu_report.graph_ms`). Every result is checked against the
PyTorch computation (largest difference relative to its largest magnitude). On an H200 every
tile lost (results/h200_session31/): Triton's GEMM alone took longer than cuBLAS's, and the
epilogue's erf and exp added about as much as the elementwise kernels it replaced, or more.

    python benchmarks/gelu_gemm.py --size 430M --out benchmarks/results/gelu_gemm_430M.json

`--elementwise` times, instead, inductor's kernels for the GELU alone at the same shape against
kernels that move the same bytes with less arithmetic (a scale; a product of two tensors; the
tanh GELU): whether the exact GELU's time goes to its erf and exp or to memory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_report import differs, graph_ms, one_line, start_report  # noqa: E402

from tuner.model.sizes import SIZES  # noqa: E402

BATCH = {"430M": 128}  # the seed's batches: 256, 128 for 430M
POSITIONS = 50
# (BLOCK_M, BLOCK_N, BLOCK_K rows, columns and inner dimension per step; GROUP_M row blocks that
# share columns in L2; software pipeline stages; warps)
SETTINGS = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st, num_warps=w)
            for bm, bn, bk, gm, st, w in (
                (128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8), (256, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 4),
                (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 3, 4), (128, 128, 128, 8, 3, 8), (64, 256, 64, 8, 4, 4),
                (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 256, 64, 4, 3, 8), (128, 128, 64, 16, 4, 4))]

EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_GELU_GRAD = 0, 1, 2


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
            epilogue: int, setting: dict) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(out, pre or None, parts or an empty tensor) of `_gemm_kernel` over a [M, K] @ b [K, N]."""
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
                setting: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, act) for x [M, K], weight [N, K] (`nn.Linear`'s), bias [N]: pre = x weight^T + bias
    and act = GELU(pre), both in x's dtype."""
    out, pre, _ = _launch(x, weight.t(), bias, None, EPILOGUE_GELU, setting)
    return pre, out


def matmul_gelu_backward(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor,
                         setting: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_pre, grad_bias fp32) for grad [M, H] (of the down projection's output), weight [H, N]
    (the down projection's), pre [M, N]: grad_pre = (grad weight) * GELU'(pre)."""
    out, _, parts = _launch(grad, weight, None, pre, EPILOGUE_GELU_GRAD, setting)
    return out, parts.sum(0)


def matmul(a: torch.Tensor, b: torch.Tensor, setting: dict) -> torch.Tensor:
    """a @ b on the same kernel with no epilogue: its GEMM alone, to set against cuBLAS's."""
    return _launch(a, b, None, None, EPILOGUE_NONE, setting)[0]


def reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_gelu` in PyTorch: what the compiled step runs (cuBLAS, then inductor's GELU)."""
    pre = F.linear(x, weight, bias)
    return pre, F.gelu(pre)


def reference_backward(grad: torch.Tensor, weight: torch.Tensor,
                       pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`matmul_gelu_backward` in PyTorch."""
    grad_pre = torch.ops.aten.gelu_backward(grad @ weight, pre)
    return grad_pre, grad_pre.float().sum(0)


def _timed(fn) -> float:
    try:
        return graph_ms(fn)
    except Exception as error:  # a setting that does not fit (shared memory, registers) is reported, not fatal
        print(f"  failed: {one_line(error)}", flush=True)
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="430M", choices=[s for s in SIZES if s not in ("tiny", "bert4rec")])
    parser.add_argument("--out", required=True)
    parser.add_argument("--elementwise", action="store_true", help="the GELU kernels alone against plain ones")
    args = parser.parse_args()
    _, header = start_report("gelu_gemm.py", [], [])
    shape = SIZES[args.size]
    rows, hidden = BATCH.get(args.size, 256) * POSITIONS, shape["hidden"]
    ffn = 4 * hidden
    torch.manual_seed(0)
    if args.elementwise:
        return _write(args.out, {**header, "size": args.size, "rows": rows, "ffn": ffn, "dtype": "bf16",
                                 "elementwise": elementwise(rows, ffn)})
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    w1 = (torch.randn(ffn, hidden, device=device) / hidden ** 0.5).to(dtype)
    b1 = (torch.randn(ffn, device=device) * 0.1).to(dtype)
    w2 = (torch.randn(hidden, ffn, device=device) / ffn ** 0.5).to(dtype)
    grad = (torch.randn(rows, hidden, device=device) * 1e-3).to(dtype)
    pre, act = reference(x, w1, b1)
    grad_pre, grad_bias = reference_backward(grad, w2, pre)
    compiled_fwd = torch.compile(reference)
    compiled_bwd = torch.compile(reference_backward)
    report = {**header, "size": args.size, "rows": rows, "hidden": hidden, "ffn": ffn, "dtype": "bf16",
              "inductor": {"forward_ms": _timed(lambda: compiled_fwd(x, w1, b1)),
                        "backward_ms": _timed(lambda: compiled_bwd(grad, w2, pre)),
                        "cublas_forward_gemm_ms": _timed(lambda: F.linear(x, w1, b1)),
                        "cublas_backward_gemm_ms": _timed(lambda: grad @ w2)},
              "settings": []}
    print(json.dumps(report["inductor"]), flush=True)
    for setting in SETTINGS:
        row = dict(setting)
        try:
            ours_pre, ours_act = linear_gelu(x, w1, b1, setting)
            ours_grad_pre, ours_grad_bias = matmul_gelu_backward(grad, w2, pre, setting)
        except Exception as error:
            row["error"] = one_line(error)
            report["settings"].append(row)
            print(json.dumps(row), flush=True)
            continue
        row.update(forward_ms=_timed(lambda: linear_gelu(x, w1, b1, setting)),
                   backward_ms=_timed(lambda: matmul_gelu_backward(grad, w2, pre, setting)),
                   gemm_forward_ms=_timed(lambda: matmul(x, w1.t(), setting)),
                   gemm_backward_ms=_timed(lambda: matmul(grad, w2, setting)),
                   pre_differs=differs(ours_pre, pre), act_differs=differs(ours_act, act),
                   grad_pre_differs=differs(ours_grad_pre, grad_pre),
                   grad_bias_differs=differs(ours_grad_bias, grad_bias))
        report["settings"].append(row)
        print(json.dumps(row), flush=True)
    done = [r for r in report["settings"] if "error" not in r]
    if done:
        # fastest first; a time that failed (NaN) last
        best_fwd, best_bwd = (min(done, key=lambda r: math.inf if math.isnan(r[key]) else r[key])
                              for key in ("forward_ms", "backward_ms"))
        report["best"] = {"forward": best_fwd, "backward": best_bwd,
                          "saved_per_layer_ms": report["inductor"]["forward_ms"] - best_fwd["forward_ms"]
                          + report["inductor"]["backward_ms"] - best_bwd["backward_ms"]}
        print(json.dumps(report["best"]), flush=True)
    _write(args.out, report)


def elementwise(rows: int, ffn: int) -> list[dict]:
    """Inductor's kernels over a [rows, ffn] bf16 tensor, each compiled alone and timed in CUDA
    graphs: the exact and tanh GELUs and their backwards against a scale (the forward's bytes) and
    a product (the backward's), with the TB/s each moves."""
    x = torch.randn(rows, ffn, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    cases = {"gelu_forward": (lambda a: F.gelu(a), (x,)),
             "gelu_tanh_forward": (lambda a: F.gelu(a, approximate="tanh"), (x,)),
             "scale": (lambda a: a * 0.5, (x,)),
             "gelu_backward": (lambda g, a: torch.ops.aten.gelu_backward(g, a), (dy, x)),
             "gelu_tanh_backward": (lambda g, a: torch.ops.aten.gelu_backward(g, a, approximate="tanh"), (dy, x)),
             "product": (lambda g, a: g * a, (dy, x))}
    out = []
    for name, (fn, inputs) in cases.items():
        compiled = torch.compile(fn)
        ms = _timed(lambda: compiled(*inputs))
        moved = (len(inputs) + 1) * x.numel() * x.element_size()
        out.append({"kernel": name, "ms": ms, "tb_per_s": moved / ms / 1e9})
        print(json.dumps(out[-1]), flush=True)
    return out


def _write(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
