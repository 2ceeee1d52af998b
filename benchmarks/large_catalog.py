"""Loss forward + backward alone at large catalogs: peak memory and time of every loss.

Inputs (hidden rows, output embedding, bias, labels) are made first; the peak excludes them, as
in the issue's own measurement. GPU: bf16 hidden and weights (what the model hands the loss
under autocast); CPU: fp32. A loss that runs out of memory is recorded as such.

    python benchmarks/large_catalog.py --device cuda                     # 160k and 1M items, 51,200 rows
    python benchmarks/large_catalog.py --device cpu --items 200000 --rows 740 --hidden 256
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.losses import LOSSES, LossConfig  # noqa: E402


def ce_low_precision(hidden, weight, bias, labels, cfg, item_logq=None):
    """`ce_bf16`: PyTorch cross-entropy straight on bf16 logits (the issue's reference figure)."""
    import torch.nn.functional as F

    return F.cross_entropy(hidden @ weight.t() + bias, labels - 1)


def measure(loss: str, items: int, rows: int, hidden: int, device: torch.device, repeats: int,
            negatives: int, chunk: int = 8192) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(rows, hidden, device=device, dtype=dtype, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(items, hidden, device=device, dtype=dtype, generator=g) * 0.05).requires_grad_()
    b = torch.zeros(items, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(1, items + 1, (rows,), device=device, generator=g)
    cfg = LossConfig(name=loss if loss in LOSSES else "ce", num_negatives=negatives, chunk=chunk)
    fn = LOSSES.get(loss, ce_low_precision)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times, value = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        for _ in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            out = fn(h, w, b, labels, cfg)
            out.backward()
            sync()
            times.append(time.perf_counter() - t0)
            value = float(out.detach())
            h.grad = w.grad = b.grad = None
    except torch.OutOfMemoryError:
        return {"loss": loss, "items": items, "rows": rows, "error": "out of memory"}
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    return {"loss": loss, "items": items, "rows": rows, "hidden": hidden, "value": value,
            "chunk": chunk if loss.startswith("cce") else None,
            "ms": statistics.median(times[1:]) * 1e3, "peak_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--items", type=int, nargs="+", default=[160_000, 1_000_000])
    parser.add_argument("--rows", type=int, default=51_200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--negatives", type=int, default=8192)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8192], help="loss_chunk values for cce losses")
    parser.add_argument("--losses", nargs="+", default=["cce", "cce_sampled", "sampled_ce", "ce_bf16", "ce"])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "large_catalog.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "command": "python benchmarks/large_catalog.py " + " ".join(sys.argv[1:]),
              "negatives": args.negatives, "rows": []}
    for items in args.items:
        for loss in args.losses:  # ce last: it is the one that may exhaust memory
            for chunk in (args.chunks if loss.startswith("cce") else [args.chunks[0]]):
                row = measure(loss, items, args.rows, args.hidden, device, args.repeats, args.negatives, chunk)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
