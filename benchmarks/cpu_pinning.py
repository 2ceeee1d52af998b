"""Does where the host's threads run move a step without CUDA graphs? (issue 5)

    python benchmarks/cpu_pinning.py --size 430M --variants amp_compile \
        --placements all cores4 pair one --repeats 3 --out OUT/cpu_pinning.json

Each run is one `step_timeline.py` process (warm-up, then --steps steps timed one by one with
CUDA events) whose CPU affinity is set before Python starts, so every thread inherits it: the
main thread, autograd's device thread (`pt_autograd_0`, the backward's host work) and CUDA's.
Placements come from the host's topology (/sys/devices/system/cpu, the GPU's NUMA node from
sysfs):
- `all`: no restriction, what every process gets by default;
- `cores4`: four logical CPUs, one per physical core, on the GPU's NUMA node;
- `pair`: the two hyperthreads of one core (the threads share a core);
- `one`: one logical CPU.
Runs cycle through variants and placements (p1 p2 p3 p1 p2 p3 ...), so a drift of the host shows
in every placement. Per run: the median step, the spread (10th and 90th percentiles), the CPU
time of the busy threads per step, the CPU each ran on last, and the time the container's CPU
quota throttled it. The JSON, with the host's topology, is written after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYS_CPU = Path("/sys/devices/system/cpu")


def cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def cores(allowed: list[int]) -> list[list[int]]:
    """The allowed logical CPUs grouped by physical core (hyperthread siblings together)."""
    groups: dict[tuple, list[int]] = {}
    for cpu in allowed:
        topo = SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            key = (topo.joinpath("physical_package_id").read_text().strip(),
                   topo.joinpath("core_id").read_text().strip())
        except OSError:
            key = ("?", str(cpu))
        groups.setdefault(key, []).append(cpu)
    return sorted(groups.values())


def gpu_node_cpus() -> tuple[int | None, list[int] | None]:
    """The GPU's NUMA node and its CPUs, from nvidia-smi's PCI bus id and sysfs (None where unknown)."""
    try:
        bus = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout.strip()
        node = int(Path(f"/sys/bus/pci/devices/{bus[-12:].lower()}/numa_node").read_text())
        if node < 0:
            return None, None
        return node, cpu_list(Path(f"/sys/devices/system/node/node{node}/cpulist").read_text())
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None, None


def placements(allowed: list[int]) -> tuple[dict[str, list[int] | None], dict]:
    """Each placement's CPU set (None: unrestricted) and the topology they came from."""
    node, node_cpus = gpu_node_cpus()
    local = [c for c in allowed if node_cpus is None or c in node_cpus] or allowed
    groups = cores(local)
    spare = [g for g in groups if 0 not in g] or groups  # CPU 0 takes most interrupts
    paired = [g for g in spare if len(g) > 1]
    sets = {"all": None, "cores4": [g[0] for g in spare[:4]], "pair": paired[0][:2] if paired else None,
            "one": [spare[0][0]]}
    topology = {"allowed": allowed, "gpu_numa_node": node, "gpu_node_cpus": node_cpus,
                "cores": cores(allowed), "threads_per_core": max(len(g) for g in groups)}
    return sets, topology


def run_once(args, variant: str, cpus: list[int] | None) -> dict:
    """One step_timeline.py process under `cpus`; its JSON record, summarised."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OUT": tmp}
        cmd = [sys.executable, str(HERE / "step_timeline.py"), args.size, variant, str(args.steps), "normal"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        files = list(Path(tmp).glob("diag_*.json"))
        if proc.returncode != 0 or not files:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        r = json.loads(files[0].read_text())
    gpu = sorted(r["gpu_ms"])
    steps = len(gpu)
    return {"step_ms": r["median_gpu"], "p10_ms": gpu[steps // 10], "p90_ms": gpu[(9 * steps) // 10],
            "wall_ms_per_step": r["wall_ms_per_step"],
            "busy_threads_cpu_ms_per_step": {k: v * 10 / steps for k, v in r["threads_ticks"].items()
                                             if v * 10 / steps >= 0.5},
            "last_cpu": r.get("cpus", {}).get("last"), "cgroup_throttled_ms": r.get("cgroup_throttled_ms")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="430M")
    parser.add_argument("--variants", nargs="+", default=["amp_compile"])
    parser.add_argument("--placements", nargs="+", default=["all", "cores4", "pair", "one"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=str(HERE / "results" / "cpu_pinning.json"))
    args = parser.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    sets, topology = placements(allowed)
    unknown = [p for p in args.placements if p not in sets]
    if unknown:
        sys.exit(f"cpu_pinning.py: unknown placement {unknown[0]!r}; choose from {', '.join(sets)}")
    lscpu = shutil.which("lscpu")
    report = {"command": "python benchmarks/cpu_pinning.py " + " ".join(sys.argv[1:]), "size": args.size,
              "steps": args.steps, "topology": topology, "placements": {p: sets[p] for p in args.placements},
              "lscpu": subprocess.run([lscpu], capture_output=True, text=True).stdout if lscpu else None,
              "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        for variant in args.variants:
            for place in args.placements:
                if place != "all" and not sets[place]:
                    continue  # no such CPUs here (no hyperthreads for `pair`)
                row = {"repeat": repeat, "variant": variant, "placement": place, "cpus": sets[place],
                       **run_once(args, variant, sets[place])}
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(report, indent=1) + "\n")
    summary = {}
    for row in report["runs"]:
        if "step_ms" in row:
            summary.setdefault(f"{row['variant']} {row['placement']}", []).append(round(row["step_ms"], 2))
    report["summary_step_ms"] = {k: {"runs": v, "median": statistics.median(v)} for k, v in summary.items()}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary_step_ms"], indent=1))


if __name__ == "__main__":
    main()
