"""GPU time of tuner.model.tiled_attention's kernels per launch setting (tile size, warps, Philox
rounds per dropout draw), forward
and forward + backward, replayed from a CUDA graph as the training step replays them (bf16, a
left-padding mask, 10% attention dropout). Median of CUDA-event timings; the shapes are
`attention_backends.py`'s (its --sizes names and their batches).

    python benchmarks/tiled_attention_tiles.py --shapes ml1m:200 130M:256 430M:512 --out OUT/tiled_attention_tiles.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_backends import PRESETS, SHAPES  # noqa: E402
from gpu_report import graph_ms, start_report  # noqa: E402

from tuner.model import short_attention, tiled_attention  # noqa: E402

LAUNCHES = [dict(BLOCK=b, num_warps=w, rounds=r) for b, w, r in
            ((64, 4, 7), (64, 4, 10), (32, 2, 7), (32, 2, 10), (128, 8, 7), (32, 4, 7))]


def inputs(size: str, length: int, device: torch.device):
    """(qkv [B, L, 3H] leaf, keep [B, L], output gradient, heads) at `size`'s shape."""
    preset, batch = PRESETS[size], SHAPES[size]
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, length, 3 * preset["hidden"], generator=gen).to(device, torch.bfloat16).requires_grad_()
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    keep = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).to(device)
    grad = torch.randn(batch, length, preset["hidden"], generator=gen).to(device, torch.bfloat16)
    return qkv, keep, grad, preset["heads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["ml1m:200"], help="SIZE:LENGTH (SIZE: a key of SHAPES)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shapes = [(s.partition(":")[0], int(s.partition(":")[2] or 200)) for s in args.shapes]
    device, report = start_report("tiled_attention_tiles.py", [s for s, _ in shapes], SHAPES)
    report.update(dropout=args.dropout, dtype="bfloat16", rows=[])
    for size, length in shapes:
        qkv, keep, grad, heads = inputs(size, length, device)
        rate = torch.full((), args.dropout, dtype=torch.float32, device=device)
        seed = short_attention.new_seed(device)
        call = lambda: tiled_attention.tiled_attention(qkv, keep, seed, rate, heads, args.dropout > 0)[0]  # noqa: E731
        for launch in LAUNCHES:
            tiled_attention.LAUNCH = {"BLOCK": launch["BLOCK"], "num_warps": launch["num_warps"]}
            tiled_attention.ROUNDS = launch["rounds"]
            row = {"size": size, "length": length, **launch}
            try:
                row["fwd_ms"] = graph_ms(call)
                row["fwd_bwd_ms"] = graph_ms(lambda: torch.autograd.grad(call(), qkv, grad))
            except Exception as exc:  # noqa: BLE001 - a setting that does not build is a result too
                row["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
