"""Inference throughput: eager vs torch.compile vs the torch.export program (issue 11).

    python benchmarks/inference.py --device cpu --size bert4rec --num-items 3416
    python benchmarks/inference.py --device cuda --size 130M --num-items 159750

What is timed is what serving does per request batch: history ids [B, max_len] (mask token
last) -> scores over the whole catalog -> top-10 (history exclusion is a cheap masked fill, left
out). Batch-1 latency (median of single requests) and throughput at a larger batch (histories/s,
median of repeated batches). Eager is the model in eval mode under `torch.inference_mode`;
compiled is `torch.compile` of the same scorer; exported is the `torch.export` program that
`tuner.export` writes, run through its `.module()` (and that module compiled, the usual way to
serve a `.pt2` fast). bf16 autocast on CUDA, fp32 on CPU. Results are appended as rows to
benchmarks/results/inference.json under the device's name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "inference.json"


def timed(fn, ids: torch.Tensor, repeats: int, device: torch.device) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn(ids)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(ids)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="bert4rec")
    parser.add_argument("--num-items", type=int, default=3416)
    parser.add_argument("--max-len", type=int)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from tuner.config import load_config
    from tuner.export import CatalogScorer, export_scorer
    from tuner.model.build import build_model

    device = torch.device(args.device)
    overrides = [f"model.size={args.size}"] + ([f"model.max_len={args.max_len}"] if args.max_len else [])
    cfg = load_config(overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg, args.num_items, pretrained=False).eval()
    model = model.to(device)
    program = export_scorer(model)  # exported on the target device (it bakes in created tensors)
    scorer = CatalogScorer(model).eval()
    exported = program.module()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def runner(module):
        def run(ids):
            with torch.inference_mode():
                if amp is not None:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        return module(ids).topk(10).indices
                return module(ids).topk(10).indices
        return run

    variants = {"eager": runner(scorer), "compiled": runner(torch.compile(scorer)),
                "exported": runner(exported), "exported+compile": runner(torch.compile(exported))}
    max_len = model.cfg.max_len
    gen = torch.Generator().manual_seed(0)

    def histories(n: int) -> torch.Tensor:
        ids = torch.randint(1, args.num_items + 1, (n, max_len), generator=gen)
        ids[:, -1] = model.cfg.mask_token
        return ids.to(device)

    one, many = histories(1), histories(args.batch)
    reference = variants["eager"](many)
    rows = []
    for name, fn in variants.items():
        # share of the eager top-10 that this variant also returns (an untrained model has near-ties,
        # which bf16 kernels may order differently)
        got = fn(many)
        overlap = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, reference)) / reference.numel())
        latency = timed(fn, one, args.repeats, device)
        batch_s = timed(fn, many, args.repeats, device)
        rows.append({"variant": name, "batch1_latency_ms": latency * 1e3, "batch": args.batch,
                     "histories_per_s": args.batch / batch_s, "top10_overlap_with_eager": overlap})
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    entry = {"device": name, "torch": torch.__version__, "size": args.size, "num_items": args.num_items,
             "max_len": max_len, "precision": "bf16 autocast" if amp is not None else "fp32",
             "command": " ".join(["python"] + sys.argv), "rows": rows}
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    data["runs"] = [r for r in data["runs"] if (r["device"], r["size"], r["num_items"]) !=
                    (entry["device"], entry["size"], entry["num_items"])] + [entry]
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
