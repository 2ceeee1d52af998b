"""AdamW's update alone: PyTorch's fused AdamW against tuner.train.adamw_kernel's Triton kernel.

For each size's model (catalog 159,750, its real parameter groups from `build_optimizer`), both
optimizers start from the same parameters and take the same gradients, with a clipping factor in
`grad_scale` as `optim.fused_clip` passes it. Reports the median step time (CUDA events), the
bandwidth it implies (28 bytes per fp32 parameter: parameter, gradient and both moments read,
three of them written) and the largest difference between the two after the timed steps:

    python benchmarks/adamw_step.py --out benchmarks/results/adamw_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.config import load_config  # noqa: E402
from tuner.model.build import build_model  # noqa: E402
from tuner.model.sizes import SIZES  # noqa: E402
from tuner.train.optim import build_optimizer  # noqa: E402

NUM_ITEMS = 159_750


def measure(size: str, device: torch.device, steps: int = 20) -> list[dict]:
    rows, models = [], {}
    for impl in ("fused", "triton"):
        cfg = load_config(overrides=[f"model.size={size}", "model.max_len=50", f"optim.adamw={impl}"])
        torch.manual_seed(0)
        model = build_model(cfg, NUM_ITEMS, pretrained=False).to(device)
        optimizer = build_optimizer(model, cfg.optim, device)
        params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in params)
        gen = torch.Generator(device).manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
        optimizer.grad_scale = torch.tensor(1.5, device=device)
        times = []
        for i in range(steps + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step()
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        rows.append({"size": size, "optimizer": f"{type(optimizer).__name__} ({impl})", "params": numel,
                     "step_ms": ms, "tb_per_s": 28 * numel / ms / 1e9})
        models[impl] = params
        print(json.dumps(rows[-1]), flush=True)
    diff = max((a - b).abs().max().item() for a, b in zip(models["fused"], models["triton"]))
    scale = max(a.abs().max().item() for a in models["fused"])
    rows[-1].update(speedup=rows[0]["step_ms"] / rows[-1]["step_ms"], max_abs_diff=diff, max_abs_param=scale)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["430M", "130M"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "adamw_step.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("adamw_step.py: needs a CUDA device")
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        sys.exit(f"adamw_step.py: unknown size {', '.join(unknown)} (sizes: {', '.join(SIZES)})")
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "command": "python benchmarks/adamw_step.py " + " ".join(sys.argv[1:]), "rows": []}
    for size in args.sizes:
        report["rows"] += measure(size, device)
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
