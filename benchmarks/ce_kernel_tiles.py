"""GPU time of tuner.ce_kernel's two passes per launch setting, against inductor's code for the
same loss, at the 430M training step's shape (1,152 predicted rows of 159,752 bf16 logit columns,
rows padded to 159,808 as inductor lays out the GEMM's output). Median of CUDA-event timings.

    python benchmarks/ce_kernel_tiles.py --out benchmarks/results/ce_kernel_tiles.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_report import median_ms, start_report  # noqa: E402

from tuner import ce_kernel  # noqa: E402

FORWARDS = [dict(BLOCK=b, PER_LANE=p, num_warps=w) for b, p, w in
            ((4096, True, 8), (2048, True, 4), (8192, True, 8), (4096, False, 8), (8192, False, 16), (2048, False, 8))]
REPEATS = 30
BACKWARDS = [dict(BLOCK_N=n, BLOCK_V=v, num_warps=w) for n, v, w in
             ((64, 256, 8), (32, 512, 8), (16, 1024, 8), (64, 128, 4), (128, 256, 8), (32, 256, 4), (16, 512, 4))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1152)
    parser.add_argument("--items", type=int, default=159_752)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    n, v = args.rows, args.items
    _, header = start_report("ce_kernel_tiles.py", [], [])
    torch.manual_seed(0)
    logits = (torch.randn(n, v + 56, device="cuda") * 3).to(torch.bfloat16)[:, :v]
    bias = torch.randn(v, device="cuda").to(torch.bfloat16)
    bias[0] = float("-inf")
    target = torch.randint(1, v, (n,), device="cuda")
    grad_rows = torch.full((n,), 1.0 / n, device="cuda")
    rows, lse = ce_kernel.catalog_ce(logits, bias, target)
    gigabytes = logits.numel() * logits.element_size() / 1e9
    report = {**header, "rows": n, "items": v, "forward": [], "backward": []}
    for setting in FORWARDS:
        ce_kernel.FORWARD = setting
        ms = median_ms(lambda: ce_kernel.catalog_ce(logits, bias, target), REPEATS)
        report["forward"].append({**setting, "ms": ms, "read_tb_per_s": gigabytes / ms})
        print(json.dumps(report["forward"][-1]), flush=True)
    for setting in BACKWARDS:
        ce_kernel.BACKWARD = setting
        ms = median_ms(lambda: ce_kernel.catalog_ce_backward(grad_rows, logits, bias, target, lse), REPEATS)
        report["backward"].append({**setting, "ms": ms, "read_write_tb_per_s": 2 * gigabytes / ms})
        print(json.dumps(report["backward"][-1]), flush=True)
    # inductor's code for the same loss from the same logits (tuner.losses._row_ce's compiled form),
    # forward, and forward + backward with the bias gradient's column sum
    leaf, bias_leaf = logits.detach().requires_grad_(), bias.detach().requires_grad_()

    def loss_from_logits(x, b):
        full = x.float() + b.float()
        hit = torch.arange(v, device="cuda")[None, :] == target[:, None]
        return (torch.logsumexp(full, 1) - torch.where(hit, full, 0.0).sum(1)).mean()

    compiled = torch.compile(loss_from_logits, fullgraph=True)
    report["inductor_forward_ms"] = median_ms(lambda: compiled(logits, bias), REPEATS)
    report["inductor_forward_backward_ms"] = median_ms(lambda: torch.autograd.grad(compiled(leaf, bias_leaf), (leaf, bias_leaf)), REPEATS)
    report["kernel_forward_backward_ms"] = min(r["ms"] for r in report["forward"]) + min(r["ms"] for r in report["backward"])
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in report if k.endswith("_ms")}))


if __name__ == "__main__":
    main()
