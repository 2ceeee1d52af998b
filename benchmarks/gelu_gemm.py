"""GPU time of `tuner.model.gelu_gemm`'s GEMMs with GELU epilogues per tile setting, against
what the compiled step runs for the same work (cuBLAS, then inductor's elementwise kernels), at a
size's feed-forward shape (rows = batch x 50 positions).

- forward: `linear_gelu` against `F.gelu(F.linear(x, w, b))` compiled (both return pre and act);
- backward: `matmul_gelu_backward` against `gelu_backward(grad @ w2, pre)` and its column sum,
  compiled;
- `matmul`: the kernel with no epilogue against cuBLAS's GEMM alone, so a slower tile shows
  whether the GEMM or the epilogue lost.
GPU time per call in a CUDA graph (`gpu_report.graph_ms`). Every result is checked against the
PyTorch computation (largest difference relative to its largest magnitude).

    python benchmarks/gelu_gemm.py --size 430M --out benchmarks/results/gelu_gemm_430M.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_report import graph_ms, start_report  # noqa: E402

from tuner.model import gelu_gemm  # noqa: E402
from tuner.model.sizes import SIZES  # noqa: E402

BATCH = {"430M": 128}  # the seed's batches: 256, 128 for 430M
POSITIONS = 50
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, stages, warps)
SETTINGS = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st, num_warps=w)
            for bm, bn, bk, gm, st, w in (
                (128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8), (256, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 4),
                (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 3, 4), (128, 128, 128, 8, 3, 8), (64, 256, 64, 8, 4, 4),
                (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 256, 64, 4, 3, 8), (128, 128, 64, 16, 4, 4))]


def _differs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest magnitude of `b`."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def _timed(fn) -> float:
    try:
        return graph_ms(fn)
    except Exception as error:  # a setting that does not fit (shared memory, registers) is reported, not fatal
        print(f"  failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="430M", choices=[s for s in SIZES if s not in ("tiny", "bert4rec")])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    _, header = start_report("gelu_gemm.py", [], [])
    shape = SIZES[args.size]
    rows, hidden = BATCH.get(args.size, 256) * POSITIONS, shape["hidden"]
    ffn = 4 * hidden
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    w1 = (torch.randn(ffn, hidden, device=device) / hidden ** 0.5).to(dtype)
    b1 = (torch.randn(ffn, device=device) * 0.1).to(dtype)
    w2 = (torch.randn(hidden, ffn, device=device) / ffn ** 0.5).to(dtype)
    grad = (torch.randn(rows, hidden, device=device) * 1e-3).to(dtype)
    pre, act = gelu_gemm.reference(x, w1, b1)
    grad_pre, grad_bias = gelu_gemm.reference_backward(grad, w2, pre)
    compiled_fwd = torch.compile(gelu_gemm.reference)
    compiled_bwd = torch.compile(gelu_gemm.reference_backward)
    report = {**header, "size": args.size, "rows": rows, "hidden": hidden, "ffn": ffn, "dtype": "bf16",
              "torch": {"forward_ms": _timed(lambda: compiled_fwd(x, w1, b1)),
                        "backward_ms": _timed(lambda: compiled_bwd(grad, w2, pre)),
                        "cublas_forward_gemm_ms": _timed(lambda: F.linear(x, w1, b1)),
                        "cublas_backward_gemm_ms": _timed(lambda: grad @ w2)},
              "settings": []}
    print(json.dumps(report["torch"]), flush=True)
    for setting in SETTINGS:
        row = dict(setting)
        try:
            ours_pre, ours_act = gelu_gemm.linear_gelu(x, w1, b1, setting)
            ours_grad_pre, ours_grad_bias = gelu_gemm.matmul_gelu_backward(grad, w2, pre, setting)
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            report["settings"].append(row)
            print(json.dumps(row), flush=True)
            continue
        row.update(forward_ms=_timed(lambda: gelu_gemm.linear_gelu(x, w1, b1, setting)),
                   backward_ms=_timed(lambda: gelu_gemm.matmul_gelu_backward(grad, w2, pre, setting)),
                   gemm_forward_ms=_timed(lambda: gelu_gemm.matmul(x, w1.t(), setting)),
                   gemm_backward_ms=_timed(lambda: gelu_gemm.matmul(grad, w2, setting)),
                   pre_differs=_differs(ours_pre, pre), act_differs=_differs(ours_act, act),
                   grad_pre_differs=_differs(ours_grad_pre, grad_pre),
                   grad_bias_differs=_differs(ours_grad_bias, grad_bias))
        report["settings"].append(row)
        print(json.dumps(row), flush=True)
    done = [r for r in report["settings"] if "error" not in r]
    if done:
        best_fwd = min(done, key=lambda r: r["forward_ms"] if r["forward_ms"] == r["forward_ms"] else 1e9)
        best_bwd = min(done, key=lambda r: r["backward_ms"] if r["backward_ms"] == r["backward_ms"] else 1e9)
        report["best"] = {"forward": best_fwd, "backward": best_bwd,
                          "saved_per_layer_ms": report["torch"]["forward_ms"] - best_fwd["forward_ms"]
                          + report["torch"]["backward_ms"] - best_bwd["backward_ms"]}
        print(json.dumps(report["best"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
