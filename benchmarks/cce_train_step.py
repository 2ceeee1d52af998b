"""A whole training step with `cce` against `ce`: `tuner bench` at given catalog sizes.

One `tuner bench` process per (catalog, loss), in the order catalogs x losses, so each row's
autotuning, compilation and peak memory are its own; writes benchmarks/results/cce_train_step.json
(render: `python benchmarks/render_tables.py --train-step`).

    python benchmarks/cce_train_step.py                          # H100: 130M, 159,750 and 1M items
    python benchmarks/cce_train_step.py --device cpu --size tiny --items 2000 --no-compile --output /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("num_items", "loss", "step_ms", "samples_per_s", "peak_mem_mb", "mfu", "predicted_positions",
        "loss_first_step")


def bench_command(size: str, items: int, loss: str, device: str, compile_: bool) -> list[str]:
    return ["-m", "tuner", "bench", "--size", size, "--num-items", str(items), "--device", device, "--loss", loss,
            "--compile" if compile_ else "--no-compile", "--json"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="130M")
    parser.add_argument("--items", type=int, nargs="+", default=[159_750, 1_000_000])
    parser.add_argument("--losses", nargs="+", default=["cce", "ce"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--timeout", type=float, default=140, help="seconds per bench process")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cce_train_step.json"))
    args = parser.parse_args()
    rows = []
    for items in args.items:
        for loss in args.losses:
            cmd = bench_command(args.size, items, loss, args.device, args.compile)
            command = "python " + " ".join(cmd)
            try:
                proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                                      timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append({"num_items": items, "loss": loss, "error": f"timed out after {args.timeout:.0f} s",
                             "command": command})
                continue
            if proc.returncode != 0:
                rows.append({"num_items": items, "loss": loss, "command": command,
                             "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]})
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({**{k: result[k] for k in KEYS if k in result}, "command": command})
            print(json.dumps(rows[-1]), flush=True)
    import torch

    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "command": "python benchmarks/cce_train_step.py " + " ".join(sys.argv[1:]),
              "note": (f"one tuner bench process per row, in this order; cce = the Triton kernel "
                       f"(tuner/cce_kernel.py) on CUDA; {args.size} configuration, batch 256, sequence 50, "
                       f"bf16 autocast on CUDA, torch.compile {'on' if args.compile else 'off'}"),
              "rows": rows}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
