"""GPU time of residual dropout + add + LayerNorm, forward and forward + backward: inductor's
compiled code against tuner.model.add_norm's kernels at several launch settings.

Shapes: the 430M step's 6,400 rows x 1,024 and the 130M step's 12,800 x 384, bf16, dropout 0.1,
the branch's bias added in the kernel (inductor: in its fused kernel), gradients on both outputs
(the sum feeds the next residual, the norm the next branch). Each variant runs 20 times inside
one CUDA graph (gpu_report.graph_ms), so the times are GPU time without launch overhead; the
median of 30 replays.
Writes benchmarks/results/add_norm_kernels.json (or --out).

    python benchmarks/add_norm_kernels.py
    python benchmarks/add_norm_kernels.py --cold --sizes 430M --sweep wide

By default the 20 calls share one set of inputs, whose 39-65 MB then sit largely in the GPU's
50 MB L2 cache from call to call. In the training step each call reads what the layer before
wrote, from memory. `--cold` gives each call its own inputs (`--sets` of them in turn, 8 by
default: about 0.6 GB at 430M), as the step does, and reports the bandwidth each way
(`forward_gbs`, `backward_gbs`: bytes the kernels must move over their time; the backward's time is
forward + backward less forward). `--sweep wide` times more launch settings. The report's `best`
holds, per size, the fastest forward and backward settings, which `gpu_throughput.py
--add-norm-settings` gives the whole training step.
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


def measure(impl, rows: int, hidden: int, sets: int = 1) -> dict:
    """GPU us per call forward and forward + backward; with `sets` > 1 the calls take turns over
    that many input sets (see --cold) and the row adds each way's bandwidth."""
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    groups = []
    for _ in range(sets):
        x, branch = make(rows, hidden).requires_grad_(), make(rows, hidden).requires_grad_()
        branch_bias, weight, bias = (make(hidden).requires_grad_() for _ in range(3))
        groups.append(((x, branch, branch_bias, weight, bias), (make(rows, hidden), make(rows, hidden))))
    turn = itertools.count()

    def forward():
        inputs, _ = groups[next(turn) % sets]
        with torch.no_grad():
            impl(*inputs)

    def step():
        inputs, (ds, dy) = groups[next(turn) % sets]
        torch.autograd.grad(impl(*inputs), inputs, (ds, dy))

    row = {"forward_us": 1e3 * graph_ms(forward, calls=20), "forward_backward_us": 1e3 * graph_ms(step, calls=20)}
    if sets > 1:  # bf16 [rows, hidden] tensors: forward reads x, branch and writes s, y; backward
        # reads s, dy, ds and writes dx, dbranch
        tensor = rows * hidden * 2
        backward_us = row["forward_backward_us"] - row["forward_us"]
        row.update(forward_gbs=4 * tensor / row["forward_us"] / 1e3,
                   backward_us=backward_us, backward_gbs=5 * tensor / backward_us / 1e3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "add_norm_kernels.json"))
    parser.add_argument("--cold", action="store_true", help="each call reads inputs of its own, from memory")
    parser.add_argument("--sets", type=int, default=8, help="input sets the --cold calls take turns over")
    parser.add_argument("--sweep", choices=("narrow", "wide"), default="narrow", help="launch settings to time")
    args = parser.parse_args()
    unknown = [size for size in args.sizes if size not in SHAPES]
    if unknown or args.sets < 1:
        sys.exit(f"add_norm_kernels.py: unknown size {unknown[0]!r} (sizes: {', '.join(SHAPES)})" if unknown
                 else "add_norm_kernels.py: --sets must be at least 1")
    sets = args.sets if args.cold else 1
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dropout": P, "dtype": "bf16",
              "command": "python benchmarks/add_norm_kernels.py " + " ".join(sys.argv[1:]), "input_sets": sets,
              "default_forward": add_norm.FORWARD, "default_backward": add_norm.BACKWARD, "rows": []}
    defaults = (dict(add_norm.FORWARD), dict(add_norm.BACKWARD))
    settings = [("default", *defaults)]
    wide = args.sweep == "wide"
    for block_r, warps in itertools.product((1, 2, 4, 8, 16) if wide else (1, 2, 4), (1, 2, 4, 8) if wide else (4, 8)):
        settings.append((f"forward r{block_r} w{warps}", dict(BLOCK_R=block_r, num_warps=warps), defaults[1]))
    backward_grid = (((1, 2, 4, 8), (8, 16, 32), (4, 8), (3,)) if wide
                     else ((2, 4), (16, 32, 64), (2, 4), (2, 3, 4)))
    for block_r, per_program, warps, stages in itertools.product(*backward_grid):
        if per_program >= block_r:
            settings.append((f"backward r{block_r} p{per_program} w{warps} s{stages}", defaults[0],
                             dict(BLOCK_R=block_r, ROWS_PER_PROGRAM=per_program, num_warps=warps, STAGES=stages)))
    for size in args.sizes:
        rows, hidden = SHAPES[size]
        compiled = torch.compile(reference)
        report["rows"].append({"size": size, "rows": rows, "hidden": hidden, "impl": "inductor",
                               **measure(compiled, rows, hidden, sets)})
        print(json.dumps(report["rows"][-1]), flush=True)
        for name, forward, backward in settings:
            add_norm.FORWARD, add_norm.BACKWARD = forward, backward
            try:
                row = measure(kernels, rows, hidden, sets)
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile or fit
                row = {"error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
            ran = add_norm.launch_settings(hidden)  # what the kernels got: warps are capped for narrow rows
            report["rows"].append({"size": size, "rows": rows, "hidden": hidden, "impl": f"kernels {name}",
                                   "forward": ran[0], "backward": ran[1], "given": [forward, backward], **row})
            print(json.dumps(report["rows"][-1]), flush=True)
        add_norm.FORWARD, add_norm.BACKWARD = defaults
        report.setdefault("best", {})[size] = best_settings([r for r in report["rows"] if r["size"] == size])
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def best_settings(rows: list[dict]) -> dict:
    """The fastest forward setting (by forward time, over the default and the forward rows) and the
    fastest backward one (by forward + backward time, over the default and the backward rows, which
    all run the default forward), as given to the kernels (`add_norm.FORWARD`, `add_norm.BACKWARD`):
    what `gpu_throughput.py --add-norm-settings` reads."""
    timed = [r for r in rows if r["impl"].startswith("kernels") and "error" not in r]
    forward = min((r for r in timed if not r["impl"].startswith("kernels backward")), key=lambda r: r["forward_us"])
    backward = min((r for r in timed if not r["impl"].startswith("kernels forward")),
                   key=lambda r: r["forward_backward_us"])
    return {"forward": forward["given"][0], "backward": backward["given"][1],
            "rows": [forward["impl"], backward["impl"]]}


if __name__ == "__main__":
    main()
