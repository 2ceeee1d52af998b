"""GPU time of residual dropout + add + LayerNorm, forward and forward + backward: inductor's
compiled code against tuner.model.add_norm's kernels at several launch settings.

Shapes: the 430M step's 6,400 rows x 1,024 and the 130M step's 12,800 x 384, bf16, dropout 0.1,
the branch's bias added in the kernel (inductor: in its fused kernel), gradients on both outputs
(the sum feeds the next residual, the norm the next branch). Each variant runs 20 times inside
one CUDA graph (gpu_report.graph_ms), so the times are GPU time without launch overhead; the
median of 30 replays.
Writes benchmarks/results/add_norm_kernels.json (or --out).

    python benchmarks/add_norm_kernels.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.model import add_norm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import graph_ms  # noqa: E402

SHAPES = {"430M": (6400, 1024), "130M": (12800, 384)}
P = 0.1


def reference(x, branch, branch_bias, weight, bias):
    s = x + F.dropout(branch + branch_bias, P)
    return s, F.layer_norm(s, s.shape[-1:], weight, bias)


def kernels(x, branch, branch_bias, weight, bias):
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int32)
    rate = torch.full((), P, dtype=torch.float32, device=x.device)
    return add_norm.dropout_add_norm(x, branch, branch_bias, weight, bias, seed, rate, True, 1e-5)


def measure(impl, rows: int, hidden: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    x, branch = make(rows, hidden).requires_grad_(), make(rows, hidden).requires_grad_()
    branch_bias, weight, bias = (make(hidden).requires_grad_() for _ in range(3))
    ds, dy = make(rows, hidden), make(rows, hidden)
    inputs = (x, branch, branch_bias, weight, bias)

    def forward():
        with torch.no_grad():
            impl(*inputs)

    def step():
        torch.autograd.grad(impl(*inputs), inputs, (ds, dy))

    return {"forward_us": 1e3 * graph_ms(forward, calls=20), "forward_backward_us": 1e3 * graph_ms(step, calls=20)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "add_norm_kernels.json"))
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dropout": P, "dtype": "bf16",
              "command": "python benchmarks/add_norm_kernels.py " + " ".join(sys.argv[1:]),
              "default_forward": add_norm.FORWARD, "default_backward": add_norm.BACKWARD, "rows": []}
    defaults = (dict(add_norm.FORWARD), dict(add_norm.BACKWARD))
    settings = [("default", *defaults)]
    for block_r, warps in itertools.product((1, 2, 4), (4, 8)):
        settings.append((f"forward r{block_r} w{warps}", dict(BLOCK_R=block_r, num_warps=warps), defaults[1]))
    for block_r, per_program, warps, stages in itertools.product((2, 4), (16, 32, 64), (2, 4), (2, 3, 4)):
        if per_program >= block_r:
            settings.append((f"backward r{block_r} p{per_program} w{warps} s{stages}", defaults[0],
                             dict(BLOCK_R=block_r, ROWS_PER_PROGRAM=per_program, num_warps=warps, STAGES=stages)))
    for size in args.sizes:
        rows, hidden = SHAPES[size]
        compiled = torch.compile(reference)
        report["rows"].append({"size": size, "rows": rows, "hidden": hidden, "impl": "inductor",
                               **measure(compiled, rows, hidden)})
        print(json.dumps(report["rows"][-1]), flush=True)
        for name, forward, backward in settings:
            add_norm.FORWARD, add_norm.BACKWARD = forward, backward
            try:
                row = measure(kernels, rows, hidden)
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile or fit
                row = {"error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
            ran = add_norm.launch_settings(hidden)  # what the kernels got: warps are capped for narrow rows
            report["rows"].append({"size": size, "rows": rows, "hidden": hidden, "impl": f"kernels {name}",
                                   "forward": ran[0], "backward": ran[1], **row})
            print(json.dumps(report["rows"][-1]), flush=True)
        add_norm.FORWARD, add_norm.BACKWARD = defaults
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
