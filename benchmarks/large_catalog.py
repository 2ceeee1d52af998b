"""Loss forward + backward alone at large catalogs: peak memory and time of every loss.

Inputs (hidden rows, output embedding, bias, labels) are made first; the peak excludes them, as
in the issue's own measurement. GPU: bf16 hidden and weights (what the model hands the loss
under autocast); CPU: fp32. A loss that runs out of memory is recorded as such. `cce` is the
Triton kernel on CUDA (tuner/cce_kernel.py), `cce_torch` the chunked PyTorch function;
`summary` gives each loss's speed-up and memory ratio against `ce_bf16` of the same run, and on
CUDA `check` the kernel's error in bf16 against an fp32 reference, beside PyTorch CE's in bf16.

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

from tuner import cce_kernel  # noqa: E402
from tuner.data.collate import IGNORE  # noqa: E402
from tuner.losses import LOSSES, ChunkedCrossEntropy, LossConfig  # noqa: E402

VARIANTS = {"cce_torch": ("cce", {"kernel": "torch"})}  # benchmark name -> (loss, LossConfig fields)


def ce_low_precision(hidden, weight, bias, labels, cfg, item_logq=None):
    """`ce_bf16`: PyTorch cross-entropy straight on bf16 logits (the issue's reference figure)."""
    import torch.nn.functional as F

    return F.cross_entropy(hidden @ weight.t() + bias, labels - 1)


def make_inputs(items: int, rows: int, hidden: int, device: torch.device):
    """Hidden rows, output embedding, bias (leaves that take gradients) and labels 1..items;
    bf16 on the GPU (what the model hands the loss under autocast), fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(rows, hidden, device=device, dtype=dtype, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(items, hidden, device=device, dtype=dtype, generator=g) * 0.05).requires_grad_()
    b = torch.zeros(items, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(1, items + 1, (rows,), device=device, generator=g)
    return h, w, b, labels


def measure(loss: str, items: int, rows: int, hidden: int, device: torch.device, repeats: int,
            negatives: int, chunk: int = 8192) -> dict:
    h, w, b, labels = make_inputs(items, rows, hidden, device)
    name, extra = VARIANTS.get(loss, (loss, {}))
    cfg = LossConfig(name=name if name in LOSSES else "ce", num_negatives=negatives, chunk=chunk, **extra)
    fn = LOSSES.get(name, ce_low_precision)
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
    ms = statistics.median(times[1:]) * 1e3
    row = {"loss": loss, "items": items, "rows": rows, "hidden": hidden, "value": value,
           "chunk": chunk if loss.startswith("cce") else None, "ms": ms, "peak_gb": peak}
    if name == "cce" or loss == "ce_bf16":  # both do the full catalog's matrix products
        row["tflops"] = cce_kernel.flops(rows, items, hidden) * (1.0 if name == "cce" else 0.75) / ms / 1e9
    return row


def check_kernel(device: torch.device, rows: int = 4096, items: int = 160_000, hidden: int = 256) -> dict:
    """Max relative error, in the loss and each gradient, of `cce` (kernel) and of PyTorch CE, both
    on bf16 inputs, against the chunked function in fp32 on the same (bf16-rounded) values."""
    g = torch.Generator(device=device).manual_seed(1)
    h = (torch.randn(rows, hidden, device=device, generator=g) * 0.5).bfloat16()
    w = (torch.randn(items, hidden, device=device, generator=g) * 0.05).bfloat16()
    b = (torch.randn(items, device=device, generator=g) * 0.1).bfloat16()
    labels = torch.randint(1, items + 1, (rows,), device=device, generator=g)
    labels[::7] = IGNORE
    ref_in = [t.float().requires_grad_() for t in (h, w, b)]
    valid = labels != IGNORE
    ref_rows = ChunkedCrossEntropy.apply(*ref_in, torch.where(valid, labels - 1, -1), 8192)
    ref = ref_rows.sum() / valid.sum()
    ref_grads = torch.autograd.grad(ref, ref_in)
    out = {"rows": rows, "items": items, "hidden": hidden}
    for name, fn in (("cce", LOSSES["cce"]), ("ce_bf16", ce_low_precision)):
        inputs = [t.clone().requires_grad_() for t in (h, w, b)]
        value = fn(*inputs, torch.where(valid, labels, -99) if name == "ce_bf16" else labels, LossConfig(name="cce"))
        grads = torch.autograd.grad(value, inputs)
        err = {"loss": abs(float(value) - float(ref)) / abs(float(ref))}
        for key, a, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
            err[key] = float((a.float() - r).abs().max() / r.abs().max())
        out[name] = err
    return out


def profile_cce(device: torch.device, items: int, rows: int, hidden: int, chunk: int, path: Path) -> None:
    """Where one cce forward + backward spends its time, kernel by kernel (after a warm-up step)."""
    h, w, b, labels = make_inputs(items, rows, hidden, device)
    cfg = LossConfig(name="cce", chunk=chunk)
    LOSSES["cce"](h, w, b, labels, cfg).backward()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        LOSSES["cce"](h, w, b, labels, cfg).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(f"cce forward + backward, {items} items, {rows} rows, hidden {hidden}, chunk {chunk}, "
                    f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))


def summarize(rows: list[dict]) -> list[dict]:
    """Each loss's speed-up and memory saving against ce_bf16 at the same catalog, where ce_bf16 ran."""
    ref = {r["items"]: r for r in rows if r["loss"] == "ce_bf16" and "ms" in r}
    return [{"loss": r["loss"], "items": r["items"], "chunk": r.get("chunk"),
             "speedup_vs_ce_bf16": ref[r["items"]]["ms"] / r["ms"],
             "memory_ratio_vs_ce_bf16": ref[r["items"]]["peak_gb"] / r["peak_gb"] if r["peak_gb"] else None}
            for r in rows if "ms" in r and r["items"] in ref and r["loss"] != "ce_bf16"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--items", type=int, nargs="+", default=[160_000, 1_000_000])
    parser.add_argument("--rows", type=int, default=51_200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--negatives", type=int, default=8192)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8192], help="loss_chunk values for cce losses")
    parser.add_argument("--losses", nargs="+",
                        default=["cce", "cce_torch", "cce_sampled", "sampled_ce", "ce_bf16", "ce"])
    parser.add_argument("--profile", help="write the PyTorch profiler's kernel table of one cce step here")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "large_catalog.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "command": "python benchmarks/large_catalog.py " + " ".join(sys.argv[1:]),
              "negatives": args.negatives, "rows": []}
    if device.type == "cuda":
        report["check"] = check_kernel(device)
        report["kernel_configs"] = cce_kernel.tuned_configs()
        print(json.dumps(report["check"]), flush=True)
    if args.profile:
        profile_cce(device, args.items[0], args.rows, args.hidden, args.chunks[0], Path(args.profile))
    for items in args.items:
        for loss in args.losses:  # ce last: it is the one that may exhaust memory
            for chunk in (args.chunks if loss.startswith("cce") else [args.chunks[0]]):
                row = measure(loss, items, args.rows, args.hidden, device, args.repeats, args.negatives, chunk)
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["summary"] = summarize(report["rows"])
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
