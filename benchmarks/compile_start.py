"""What each new process pays before it trains: compile with an empty cache, then from the cache.

    python benchmarks/compile_start.py --device cpu --size tiny --processes 3 --out OUT/compile_start_cpu.json
    python benchmarks/compile_start.py --device cuda --size 130M --num-items 159750 --processes 3

Every trial of a search is a process of its own, so the compiled step's start-up is paid per trial:
in full by the first process on a machine (an empty inductor cache), and by every later one as
far as the on-disk caches (inductor's FX graph cache, AOTAutograd's cache) do not cover it. For
each wrapper (`train.cpp_wrapper=off`: Python; `on`: C++), this runs `--processes` processes one
after the other on one fresh cache directory (TORCHINDUCTOR_CACHE_DIR) and records for each:
- `start_s`: from the process's launch to the end of its first two training steps (imports, model,
  compile or cache load, two steps);
- `first_steps_s`: the two steps alone (where the compile or the cache load happens);
- `step_ms`: the median of the next --steps steps, and whether the first steps' losses match those of
  the first process with the same overrides.
The first process of each wrapper starts cold; the rest find the cache warm. `--trials` gives each
process its own config overrides, as the trials of a search differ (process n takes the n-th,
cycling): whether the cache still covers a trial whose dropout, learning rate or weight decay is
new.

    python benchmarks/compile_start.py --device cpu --processes 4 \
        --trials "model.dropout=0.1 optim.lr=1e-3 optim.weight_decay=0.01" \
                 "model.dropout=0.2 optim.lr=2e-3 optim.weight_decay=0.05"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def child(spec_json: str, launched: float) -> None:
    """One process: prepare the `tuner bench` step, time the first two steps and the next ones."""
    import torch

    from tuner.bench import BenchSpec, prepare_bench

    spec = BenchSpec(**json.loads(spec_json))
    device = torch.device(spec.device)
    bench = prepare_bench(spec, device)
    batches = [b.to(device) for b in bench.batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    losses = [float(bench.step(b)) for b in batches[:2]]
    sync()
    first = time.perf_counter() - t0
    start = time.time() - launched
    times = []
    for b in batches[2:]:
        t = time.perf_counter()
        bench.step(b)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"start_s": start, "first_steps_s": first, "step_ms": statistics.median(times),
                      "losses": losses}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--num-items", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--wrappers", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--trials", nargs="+", default=[""],
                        help="config overrides per process, space-separated in one argument (cycling)")
    parser.add_argument("--out", default=str(HERE / "results" / "compile_start.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.launched)
        return
    if args.processes < 1:
        sys.exit("compile_start.py: --processes must be at least 1")
    report = {"command": "python benchmarks/compile_start.py " + " ".join(sys.argv[1:]), "device": args.device,
              "size": args.size, "num_items": args.num_items, "batch_size": args.batch_size, "rows": []}
    if args.device == "cuda":
        import torch

        report["device"] = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for wrapper in args.wrappers:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            first_losses = {}  # per trial: the first process's losses
            for n in range(args.processes):
                trial = args.trials[n % len(args.trials)]
                spec = {"size": args.size, "num_items": args.num_items, "batch_size": args.batch_size, "seq_len": 50,
                        "steps": args.steps, "warmup": 1, "amp": args.device == "cuda", "compile": True,
                        "device": args.device, "overrides": [f"train.cpp_wrapper={wrapper}", *trial.split()]}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec),
                       "--launched", repr(time.time())]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    losses = row.pop("losses")
                    # against the first process with the same overrides (None for that one)
                    row["same_losses_as_first"] = first_losses[trial] == losses if trial in first_losses else None
                    first_losses.setdefault(trial, losses)
                row = {"wrapper": "cpp" if wrapper == "on" else "python", "process": n + 1,
                       "cache": "cold" if n == 0 else "warm", "trial": trial, **row}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
