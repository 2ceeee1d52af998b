"""GPU time of tuner.model.tiled_attention's kernels per launch setting, forward and forward +
backward, replayed from a CUDA graph as the training step replays them (bf16, a left-padding
mask, 10% attention dropout). Median of CUDA-event timings; the shapes are
`attention_backends.py`'s (its --sizes names and their batches).

Each kernel (the forward, the backward's dQ and dK/dV kernels) takes its own (query positions,
key positions, warps). Each row changes one kernel's setting from the length's default
(`tiled_attention.launch_settings`), and the last row per shape runs the best of each: the
forward's by forward time, the backward kernels' by forward + backward time.

    python benchmarks/tiled_attention_tiles.py --shapes ml1m:200 430M:512 --out OUT/tiled_attention_tiles.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends import SHAPES, inputs  # noqa: E402
from gpu_report import graph_ms, one_line, start_report  # noqa: E402

from tuner.model import short_attention, tiled_attention  # noqa: E402

# per kernel, the settings tried besides the default's: (query positions, key positions, warps)
CHOICES = {"forward": [(128, 64, 4), (128, 64, 8), (128, 128, 8)],
           "dq": [(128, 32, 4), (128, 64, 8), (64, 32, 4)],
           "dkdv": [(32, 128, 4), (64, 128, 8), (32, 64, 4)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["ml1m:200"], help="SIZE:LENGTH (SIZE: a key of SHAPES)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shapes = [(s.partition(":")[0], int(s.partition(":")[2] or 200)) for s in args.shapes]
    device, report = start_report("tiled_attention_tiles.py", [s for s, _ in shapes], SHAPES)
    report.update(dropout=args.dropout, dtype="bfloat16", rounds=tiled_attention.ROUNDS, rows=[])
    for size, length in shapes:
        x = inputs(size, length, device)
        qkv, keep, grad, heads = x.packed, x.keep_rows, x.packed_grad, x.heads
        del x  # SDPA's layout (q, k, v and their gradient) is not used here: about 0.5 GB at 430M:512
        rate = torch.full((), args.dropout, dtype=torch.float32, device=device)
        seed = short_attention.new_seed(device)
        call = lambda: tiled_attention.tiled_attention(qkv, keep, seed, rate, heads, args.dropout > 0)[0]  # noqa: E731
        default = dict(tiled_attention.launch_settings(length))

        def measure(kernel: str, launch: dict) -> dict:
            tiled_attention.LAUNCH = launch
            row = {"size": size, "length": length, "kernel": kernel, **{k: list(v) for k, v in launch.items()}}
            try:
                row["fwd_ms"] = graph_ms(call)
                row["fwd_bwd_ms"] = graph_ms(lambda: torch.autograd.grad(call(), qkv, grad))
            except Exception as exc:  # noqa: BLE001 - a setting that does not build is a result too
                row["error"] = one_line(exc)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            return row

        base = measure("default", default)
        best = dict(default)
        for kernel, choices in CHOICES.items():
            tried = [base] + [measure(kernel, {**default, kernel: choice}) for choice in choices]
            timing = "fwd_ms" if kernel == "forward" else "fwd_bwd_ms"
            best[kernel] = tuple(min((r for r in tried if "error" not in r), key=lambda r: r[timing])[kernel])
        measure("best", best)
        tiled_attention.LAUNCH = None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
