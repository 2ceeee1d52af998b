"""Our training step under settings that only hold per process, against the seed's step in a
process of its own: `gpu_throughput.py` runs, alternating, round after round.

Some settings are read once per process: cuBLAS's workspace (`CUBLAS_WORKSPACE_CONFIG`,
`CUBLASLT_WORKSPACE_SIZE`) is sized at the first GEMM. In one `gpu_throughput.py` process the seed's
step would run under them too, so each round here runs the seed's step in a process with the
environment as it is, then each arm's step (ours only) in a process with the arm's variables:

    python benchmarks/process_ab.py --size 430M --rounds 3 --out DIR \\
        --arm default= --arm noworkspace=CUBLAS_WORKSPACE_CONFIG=:0:0,CUBLASLT_WORKSPACE_SIZE=0

DIR gets every process's gpu_throughput.py report (seed_R.json, ARM_R.json) and process_ab.json:
per arm, our step's ms in each round and their median, the ratio to the seed's step of the same
round and the median of those ratios, and the step's ratio to the first arm's in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "gpu_throughput.py"


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """NAME=KEY=VALUE,KEY=VALUE (or NAME= for no variables) -> (name, variables)."""
    name, sep, rest = text.partition("=")
    pairs = [p.partition("=") for p in rest.split(",") if p]
    if not sep or not name.isidentifier() or any(not key or not eq for key, eq, _ in pairs):
        raise ValueError(f"--arm takes NAME=KEY=VALUE,KEY=VALUE or NAME=, not {text!r}")
    return name, {key: value for key, _, value in pairs}


def step_ms(report: dict, size: str, variant: str, seed: bool = False) -> float | None:
    """Our step's (or with `seed`, the seed's) ms of `size` and `variant` in a gpu_throughput.py report."""
    rows = report["peer_rows" if seed else "rows"]
    return next((r["step_ms"] for r in rows if (r["size"], r["variant"]) == (size, variant)), None)


def median(values: list) -> float | None:
    """The median of the values a process gave (None where it failed), or None if none did."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rounds: list[dict], arms: list[str]) -> dict:
    """rounds: [{"seed": ms, ARM: ms, ...}] (None where a process failed) -> per arm its steps,
    their median, the ratios to the same round's seed step and their median, and the ratios to the
    first arm's step in the same round."""
    seeds = [r.get("seed") for r in rounds]
    out = {"seed_ms": seeds, "seed_median_ms": median(seeds), "arms": {}}
    for arm in arms:
        steps = [r.get(arm) for r in rounds]
        speedups = [s / a if s and a else None for s, a in zip(seeds, steps)]
        against_first = [a / f if a and f else None for a, f in zip(steps, (r.get(arms[0]) for r in rounds))]
        out["arms"][arm] = {"step_ms": steps, "median_ms": median(steps), "speedup_vs_seed": speedups,
                            "median_speedup_vs_seed": median(speedups), f"step_vs_{arms[0]}": against_first}
    return out


def run(args: list[str], env: dict[str, str], output: Path, timeout: float) -> dict | None:
    """One gpu_throughput.py process; its report, or None (the failure's last lines in output.err)."""
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--output", str(output)], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=timeout)
        failed = proc.returncode != 0 and proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        failed = f"ran past {timeout:.0f} s"
    if failed or not output.exists():
        output.with_suffix(".err").write_text(failed or "no report written")
        return None
    return json.loads(output.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="430M")
    parser.add_argument("--variant", default="amp_compile_graphs", help="our step's variant")
    parser.add_argument("--seed-variant", default="amp_compile")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=KEY=VALUE,...")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        arms = dict(parse_arm(a) for a in args.arm)
    except ValueError as exc:
        sys.exit(f"process_ab.py: {exc}")
    if args.rounds < 1:
        sys.exit("process_ab.py: --rounds must be at least 1")
    import torch

    if not torch.cuda.is_available():
        sys.exit("process_ab.py: needs a CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["--sizes", args.size]
    rounds = []
    for r in range(1, args.rounds + 1):
        seed = run([*base, "--seed-variants", args.seed_variant, "--variants"], {}, out / f"seed_{r}.json",
                   args.timeout)
        row = {"seed": seed and step_ms(seed, args.size, args.seed_variant, seed=True)}
        for name, env in arms.items():
            ours = run([*base, "--seed-variants", "--variants", args.variant], env, out / f"{name}_{r}.json",
                       args.timeout)
            row[name] = ours and step_ms(ours, args.size, args.variant)
        rounds.append(row)
        print(json.dumps({"round": r, **row}), flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python benchmarks/process_ab.py " + " ".join(sys.argv[1:]), "size": args.size,
              "variant": args.variant, "seed_variant": args.seed_variant,
              "environments": arms, "rounds": rounds, **summarize(rounds, list(arms))}
    (out / "process_ab.json").write_text(json.dumps(report, indent=1) + "\n")
    medians = {name: {k: v for k, v in arm.items() if k.startswith("median")} for name, arm in report["arms"].items()}
    print(json.dumps(medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
