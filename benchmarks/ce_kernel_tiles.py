"""GPU time of tuner.ce_kernel's two passes per launch setting, against inductor's code for the
same loss, at the 430M training step's shape (1,152 predicted rows of 159,752 bf16 logit columns,
rows padded to 159,808 as inductor lays out the GEMM's output). GPU time per call as the step
runs them, in a CUDA graph (`graph_ms`: ten calls captured and replayed, the median of 30
replays); `--timing events` times each call alone by CUDA events, host launch costs included
(the files before session 29 were timed so).

Every setting's results are checked against the module's defaults (the same rows, lse and
gradients up to float rounding); the report's `best` holds the fastest forward and backward
settings, which `gpu_throughput.py --ce-settings` gives the training step.

    python benchmarks/ce_kernel_tiles.py --out benchmarks/results/ce_kernel_tiles.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_report import differs, graph_ms, median_ms, start_report  # noqa: E402

from tuner import ce_kernel  # noqa: E402

REPEATS = 30
# (BLOCK_R rows per program, BLOCK columns per iteration, SPLIT programs per row block, STAGES, warps)
FORWARDS = [dict(BLOCK_R=r, BLOCK=b, SPLIT=s, STAGES=st, num_warps=w) for r, b, s, st, w in (
    (1, 8192, 1, 1, 16), (1, 8192, 1, 2, 16), (1, 4096, 1, 3, 8), (2, 4096, 1, 1, 8), (2, 4096, 1, 2, 8),
    (4, 2048, 1, 1, 8), (4, 2048, 1, 2, 8), (4, 2048, 1, 3, 8), (8, 1024, 1, 2, 8), (8, 2048, 1, 2, 16),
    (1, 4096, 4, 2, 8), (2, 4096, 4, 2, 8), (4, 2048, 4, 2, 8), (4, 2048, 2, 2, 8), (1, 8192, 2, 1, 16),
    (4, 1024, 8, 2, 4), (2, 2048, 8, 3, 4))]
# (BLOCK_N, BLOCK_V, COLUMN_PROGRAMS per row block (0: one per column block), STAGES, warps)
BACKWARDS = [dict(BLOCK_N=n, BLOCK_V=v, COLUMN_PROGRAMS=c, STAGES=st, num_warps=w) for n, v, c, st, w in (
    (64, 256, 0, 1, 8), (32, 512, 0, 1, 8), (64, 256, 156, 2, 8), (64, 256, 156, 3, 8), (64, 256, 78, 2, 8),
    (64, 256, 312, 2, 8), (32, 256, 156, 2, 4), (32, 512, 78, 2, 8), (32, 512, 156, 3, 8), (16, 1024, 39, 2, 8),
    (64, 128, 312, 3, 4), (128, 256, 78, 2, 8), (128, 128, 156, 3, 8), (16, 512, 78, 3, 4))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1152)  # the 430M step's profile on an H200: 1,344
    parser.add_argument("--items", type=int, default=159_752)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timing", choices=("graph", "events"), default="graph")
    args = parser.parse_args()
    timed = graph_ms if args.timing == "graph" else functools.partial(median_ms, repeats=REPEATS)
    n, v = args.rows, args.items
    _, header = start_report("ce_kernel_tiles.py", [], [])
    torch.manual_seed(0)
    logits = (torch.randn(n, v + 56, device="cuda") * 3).to(torch.bfloat16)[:, :v]
    bias = torch.randn(v, device="cuda").to(torch.bfloat16)
    bias[0] = float("-inf")
    target = torch.randint(1, v, (n,), device="cuda")
    grad_rows = torch.full((n,), 1.0 / n, device="cuda")
    gigabytes = logits.numel() * logits.element_size() / 1e9
    report = {**header, "rows": n, "items": v, "timing": args.timing, "forward": [], "backward": []}
    defaults = dict(ce_kernel.FORWARD), dict(ce_kernel.BACKWARD)
    rows, lse = ce_kernel.catalog_ce(logits, bias, target)
    grads = ce_kernel.catalog_ce_backward(grad_rows, logits, bias, target, lse)
    for setting in FORWARDS:
        ce_kernel.FORWARD = setting
        ms = timed(lambda: ce_kernel.catalog_ce(logits, bias, target))
        out = ce_kernel.catalog_ce(logits, bias, target)
        report["forward"].append({**setting, "ms": ms, "read_tb_per_s": gigabytes / ms,
                                  "rows_differ": differs(out[0], rows), "lse_differ": differs(out[1], lse)})
        print(json.dumps(report["forward"][-1]), flush=True)
    ce_kernel.FORWARD = defaults[0]
    for setting in BACKWARDS:
        ce_kernel.BACKWARD = setting
        ms = timed(lambda: ce_kernel.catalog_ce_backward(grad_rows, logits, bias, target, lse))
        out = ce_kernel.catalog_ce_backward(grad_rows, logits, bias, target, lse)
        report["backward"].append({**setting, "ms": ms, "read_write_tb_per_s": 2 * gigabytes / ms,
                                   "grad_differ": differs(out[0], grads[0]),
                                   "bias_grad_differ": differs(out[1][1:], grads[1][1:])})
        print(json.dumps(report["backward"][-1]), flush=True)
    ce_kernel.BACKWARD = defaults[1]
    report["best"] = {"forward": best_setting(report["forward"], FORWARDS),
                      "backward": best_setting(report["backward"], BACKWARDS)}
    # inductor's code for the same loss from the same logits (tuner.losses._row_ce's compiled form),
    # forward, and forward + backward with the bias gradient's column sum
    leaf, bias_leaf = logits.detach().requires_grad_(), bias.detach().requires_grad_()

    def loss_from_logits(x, b):
        full = x.float() + b.float()
        hit = torch.arange(v, device="cuda")[None, :] == target[:, None]
        return (torch.logsumexp(full, 1) - torch.where(hit, full, 0.0).sum(1)).mean()

    compiled = torch.compile(loss_from_logits, fullgraph=True)  # timed by events, whatever --timing says
    report["inductor_forward_ms"] = median_ms(lambda: compiled(logits, bias), REPEATS)
    report["inductor_forward_backward_ms"] = median_ms(
        lambda: torch.autograd.grad(compiled(leaf, bias_leaf), (leaf, bias_leaf)), REPEATS)
    report["kernel_forward_backward_ms"] = sum(min(r["ms"] for r in report[k]) for k in ("forward", "backward"))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in report if k.endswith("_ms")}))


def best_setting(rows: list[dict], settings: list[dict]) -> dict:
    """The launch setting (the kernel's keyword arguments: the keys of `settings`, the sweep's list)
    of the fastest row whose results match the defaults' (within 1e-2 of the largest value: bf16
    gradients' rounding)."""
    keys = set().union(*settings)
    good = [r for r in rows if all(v < 1e-2 for k, v in r.items() if k.endswith("_differ"))]
    return {k: v for k, v in min(good, key=lambda r: r["ms"]).items() if k in keys}


if __name__ == "__main__":
    main()
