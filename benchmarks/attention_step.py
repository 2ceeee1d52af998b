"""The whole training step on each attention kernel, one `tuner bench` process per kernel, one after
the other in one run: at benchmarks/ml1m.yaml's model (the paper's size at hidden 256, 4 heads, 200
positions) with CUDA graphs, as the ML-1M trials train. Each row is `tuner bench --json`'s output
(median step time over windows of back-to-back steps) with the kernel and the command.

    python benchmarks/attention_step.py --out OUT/attention_step_ml1m.json
    python benchmarks/attention_step.py --device cpu --kernels math --steps 3 --out /tmp/a.json  # a CPU check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from attention_backends import PRESETS, SHAPES
from paths import ROOT

ML1M = PRESETS["ml1m"]  # attention_backends.py's ML-1M shape; 3,416 items: ML-1M's catalog
ML1M_SHAPE = ["--size", "bert4rec", "--hidden", str(ML1M["hidden"]), "--set", f"model.heads={ML1M['heads']}",
              "--seq-len", str(ML1M["max_len"]), "--num-items", "3416", "--batch-size", str(SHAPES["ml1m"])]
GRAPHS = ["--compile", "--compile-mode", "reduce-overhead", "--static-shapes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["triton", "efficient"], help="model.attention values")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shape = GRAPHS if args.device == "cuda" else ["--no-compile"]
    report = {"command": "python benchmarks/attention_step.py " + " ".join(sys.argv[1:]), "rows": []}
    for kernel in args.kernels:
        cmd = [sys.executable, "-m", "tuner", "bench", "--device", args.device, *ML1M_SHAPE, *shape,
               "--steps", str(args.steps), "--json", "--set", f"model.attention={kernel}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"attention_step.py: {kernel}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        report["rows"].append({"kernel": kernel, "bench_command": "python -m tuner " + " ".join(cmd[3:]), **row})
        print(json.dumps({k: row.get(k) for k in ("step_ms", "samples_per_s", "peak_mem_mb")} | {"kernel": kernel}),
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
