"""Full-catalog cross-entropy, forward + backward: log_softmax + nll_loss against logsumexp - target.

Both compute the same loss over [N, V] logits (N prediction slots, V = 159,750 items), with the
catalog GEMMs, under bf16 autocast and `torch.compile`, in one process:

- `log_softmax`: `F.cross_entropy` on the fp32-upcast logits (what `tuner.losses.full_ce` was).
  The backward of log_softmax needs a row sum of its incoming gradient, so the compiled backward
  reduces over each row of logits before it writes their gradient.
- `logsumexp_gather`: logsumexp(logits) - logits.gather(target). The backward is softmax minus
  the one-hot target, but the gather's backward scatters into a zeroed [N, V] buffer of its own.
- `logsumexp`: `tuner.losses.full_ce` now: the target logit picked by a one-hot compare and a row
  sum under compile, which joins the logsumexp's pass forward and the softmax's backward.

    python benchmarks/ce_backward.py --out benchmarks/results/ce_backward.json

Reports median milliseconds (CUDA events) and peak memory per variant, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.data.collate import IGNORE, static_predictions  # noqa: E402
from tuner.losses import LossConfig, _masked_mean, catalog_logits, full_ce  # noqa: E402
from tuner.model.sizes import SIZES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import median_ms, start_report  # noqa: E402

NUM_ITEMS = 159_750
BATCH = {"130M": 256, "430M": 128}  # the seed's batch per size


def log_softmax_ce(hidden, weight, bias, labels):
    logits = catalog_logits(hidden, weight, bias, LossConfig().align)
    return F.cross_entropy(logits.float(), torch.where(labels == IGNORE, -100, labels - 1), ignore_index=-100)


def logsumexp_gather_ce(hidden, weight, bias, labels):
    logits = catalog_logits(hidden, weight, bias, LossConfig().align).float()
    target = logits.gather(1, (labels.clamp(min=1) - 1)[:, None]).squeeze(1)
    rows = torch.logsumexp(logits, dim=1) - target
    return _masked_mean(rows, labels != IGNORE)


def logsumexp_ce(hidden, weight, bias, labels):
    return full_ce(hidden, weight, bias, labels, LossConfig())


def measure(size: str, device: torch.device, repeats: int = 30) -> list[dict]:
    hidden_size = SIZES[size]["hidden"]
    rows = static_predictions(BATCH[size], 50, 0.2, 0.1)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(NUM_ITEMS, hidden_size, generator=gen) * 0.02).to(device).requires_grad_()
    bias = torch.zeros(NUM_ITEMS, device=device, requires_grad=True)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(device).requires_grad_()
    labels = torch.randint(1, NUM_ITEMS + 1, (rows,), generator=gen)
    labels[-rows // 10:] = IGNORE  # padding slots, as static batches have
    labels = labels.to(device)
    results = []
    variants = (("log_softmax", log_softmax_ce), ("logsumexp_gather", logsumexp_gather_ce), ("logsumexp", logsumexp_ce))
    for name, fn in variants:
        compiled = torch.compile(fn)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(hidden, weight, bias, labels)
            loss.backward()
            return loss

        for _ in range(5):
            loss = step()  # the same every call: nothing updates the weights
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)  # the timed calls' peak, not compilation's
        ms = median_ms(step, repeats, warmup=0)
        results.append({"size": size, "variant": name, "rows": rows, "items": NUM_ITEMS, "hidden": hidden_size,
                        "fwd_bwd_ms": ms, "loss": float(loss),
                        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20})
        print(json.dumps(results[-1]), flush=True)
        weight.grad = bias.grad = hidden.grad = None
        torch._dynamo.reset()
    for row in results[1:]:
        row["speedup_vs_log_softmax"] = results[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(BATCH))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ce_backward.json"))
    args = parser.parse_args()
    device, report = start_report("ce_backward.py", args.sizes, BATCH)
    report["rows"] = []
    for size in args.sizes:
        report["rows"] += measure(size, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
