"""Attention kernels at BERT4Rec's shapes: forward + backward time of each SDPA backend.

BERT4Rec's sequences are short (50 items at the seed's settings) and padded on the left, so
attention takes a key-padding mask and (in training) dropout. Flash attention takes no mask, and
the kernels PyTorch picks are tuned for long sequences. This measures, for each size's shape
(batch, heads, head dim 64, length 50, bf16, 10% attention dropout, a padding mask), the median
GPU time of each backend's forward and of its forward + backward, eager and under
`torch.compile`, in one process. Calls are replayed from a CUDA graph, as the training step
replays them, because one layer's attention takes less GPU time than the host needs to launch it:

    python benchmarks/attention_backends.py --out benchmarks/results/attention_backends.json

The `triton` rows are the model's Triton kernels: tuner.model.short_attention's (one program per
sequence and head) up to 128 positions, tuner.model.tiled_attention's beyond (`--length 200
--sizes ml1m`: benchmarks/ml1m.yaml's shape).
`model.attention` pins the winner in training; benchmarks/gpu_throughput.py's `_attn_<name>`
variants measure it in the whole step.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.model import short_attention, tiled_attention  # noqa: E402
from tuner.model.bert4rec import ATTENTION_BACKENDS  # noqa: E402
from tuner.model.sizes import SIZES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import graph_ms, one_line, start_report  # noqa: E402

SHAPES = {"130M": 256, "430M": 128, "ml1m": 128}  # size -> the seed's batch (ml1m: benchmarks/ml1m.yaml's)
# benchmarks/ml1m.yaml's model (the paper's size at hidden 256, heads 4): run it with --length 200
PRESETS = {**SIZES, "ml1m": dict(hidden=256, layers=2, heads=4, max_len=200)}


def attention(q, k, v, keep, backend, dropout: float):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)


def short_kernel(qkv, keep, heads: int, dropout: float):
    """The model's Triton attention: short_attention's kernels, tiled_attention's over 128 positions."""
    rate = torch.full((), dropout, dtype=torch.float32, device=qkv.device)
    return short_attention.attend(qkv, keep, short_attention.new_seed(qkv.device), rate, heads, dropout > 0)


@dataclass
class Inputs:
    """One shape's attention inputs (bf16, seed 0) in both layouts: SDPA's [B, heads, L, d] leaves
    with a [B, 1, 1, L] mask, and the same numbers as the fused projection's [B, L, 3H] output
    (`packed`) with a [B, L] mask and a [B, L, H] output gradient, the layout the model hands the
    Triton kernels (so SDPA's rows leave out the transposes and the gradients' concatenation that
    the model pays for)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor
    grad: torch.Tensor
    packed: torch.Tensor
    keep_rows: torch.Tensor
    packed_grad: torch.Tensor
    heads: int


def inputs(size: str, length: int, device: torch.device) -> Inputs:
    """`size`'s shape (PRESETS' heads and width, SHAPES' batch) at `length` positions, left-padded
    to random lengths as the collate path pads."""
    preset, batch = PRESETS[size], SHAPES[size]
    heads, head_dim = preset["heads"], preset["hidden"] // preset["heads"]
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, length, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device, torch.bfloat16).requires_grad_() for _ in range(3))
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    keep = (torch.arange(length)[None, :] >= (length - lengths)[:, None])[:, None, None, :].to(device)
    grad = torch.randn(shape, generator=gen).to(device, torch.bfloat16)
    packed = torch.cat([t.detach().transpose(1, 2).reshape(batch, length, -1) for t in (q, k, v)], -1)
    packed_grad = grad.transpose(1, 2).reshape(batch, length, -1).contiguous()
    return Inputs(q, k, v, keep, grad, packed.requires_grad_(), keep.view(batch, length), packed_grad, heads)


def measure(size: str, length: int, dropout: float, device: torch.device,
            backends: tuple[str, ...] = ()) -> list[dict]:
    preset, x = PRESETS[size], inputs(size, length, device)
    q, k, v, keep, grad = x.q, x.k, x.v, x.keep, x.grad
    calls = {name: (attention, (q, k, v, keep, backend, dropout), (q, k, v), grad)
             for name, backend in ATTENTION_BACKENDS.items() if backend is not None and name != "triton"}
    calls["triton"] = (short_kernel, (x.packed, x.keep_rows, x.heads, dropout), (x.packed,), x.packed_grad)
    calls = {name: call for name, call in calls.items() if not backends or name in backends}
    rows = []
    for name, (call, args, leaves, out_grad) in calls.items():
        for compiled in (False, True):
            fn = torch.compile(call) if compiled else call

            def forward():
                fn(*args)

            def step():
                torch.autograd.grad(fn(*args), leaves, out_grad)

            row = {"size": size, "backend": name, "compiled": compiled, "dropout": dropout}
            try:
                row["fwd_ms"] = graph_ms(forward)
                row["fwd_bwd_ms"] = graph_ms(step)
            except Exception as exc:  # noqa: BLE001 - a backend that rejects the shape is a result too
                row.update(fwd_bwd_ms=None, error=one_line(exc))
            else:
                row["per_step_ms"] = row["fwd_bwd_ms"] * preset["layers"]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES))
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.1], help="attention dropout rates to measure")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_backends.json"))
    parser.add_argument("--tiled-launch", type=json.loads, default={},
                        help="JSON: settings of tiled_attention.LAUNCH for the triton rows over 128 positions, "
                             'e.g. {"forward": [64, 64, 4]}')
    parser.add_argument("--rounds", type=int, default=getattr(tiled_attention, "ROUNDS", 10),
                        help="Philox rounds per dropout draw in the triton rows (tiled_attention.ROUNDS)")
    parser.add_argument("--backends", nargs="+", default=[], help="only these backends (default: all)")
    args = parser.parse_args()
    device, report = start_report("attention_backends.py", args.sizes, SHAPES)
    # the triton rows' tile settings (session 24's trees: one LAUNCH of BLOCK and num_warps)
    launch_of = getattr(tiled_attention, "launch_settings", lambda length: tiled_attention.LAUNCH)
    if args.tiled_launch:  # one setting at every length
        tiled_attention.LAUNCH = {**launch_of(args.length), **args.tiled_launch}
    tiled_attention.ROUNDS = args.rounds
    report.update(length=args.length, dropout=args.dropout, dtype="bfloat16", tiled_launch=launch_of(args.length),
                  rounds=args.rounds, rows=[])
    for size in args.sizes:
        for dropout in args.dropout:
            report["rows"] += measure(size, args.length, dropout, device, tuple(args.backends))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
