"""Per-step timeline of one `gpu_throughput.py` variant: where a step without CUDA graphs loses time.

    python benchmarks/step_timeline.py SIZE VARIANT STEPS MODE     (MODE: normal | freeze | disable)

Builds the variant's step as `gpu_throughput.py` does, runs 6 warm-up steps, then STEPS steps
back to back, and writes `$OUT/diag_SIZE_VARIANT_MODE.json` (OUT defaults to the working folder):
- `gpu_ms`: the time between CUDA events recorded at the start of consecutive steps;
- `host_ms`: the host's time per step call; `cpu_ms`: the main thread's CPU time per step
  (the backward's host work runs on autograd's device thread, `pt_autograd_0`, not counted there);
- `threads_ticks`: CPU ticks (10 ms) each thread of the process used over the timed steps;
- `gcs`: Python garbage collections (generation, ms, steps done when it ended), warm-up included;
- `mem`: CUDA allocator counters over the timed steps (new cudaMalloc calls and the like);
- `n`: predicted positions per batch;
- `cpus`: the logical CPUs the process may run on, and the one each busy thread ran on last;
- `cgroup_throttled_ms`: the time the container's CPU quota held the process back over the timed
  steps (cgroup v2 `cpu.stat`; null where there is none).
MODE freeze runs `gc.freeze()` after warm-up; disable also turns the collector off.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import seed_batch_size, variant_spec  # noqa: E402

from tuner.bench import prepare_bench  # noqa: E402

WARMUP = 6
ALLOCATOR = ("num_alloc_retries", "num_device_alloc", "num_device_free", "segment.all.allocated",
             "segment.all.freed")


def thread_stats() -> dict[str, list[str]]:
    """Each thread's /proc stat fields after its name (field 3 onwards), keyed "tid:name"."""
    stats = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        stats[f"{tid}:{name}"] = stat[stat.rindex(")") + 2:].split()
    return stats


def thread_ticks() -> dict[str, int]:
    """user + system ticks per thread of this process, keyed "tid:name"."""
    return {key: int(fields[11]) + int(fields[12]) for key, fields in thread_stats().items()}


def thread_cpus() -> dict[str, int]:
    """The logical CPU each thread of this process last ran on, keyed "tid:name"."""
    return {key: int(fields[36]) for key, fields in thread_stats().items()}


def throttled_ms() -> float | None:
    """Milliseconds the cgroup's CPU quota has throttled this container (cgroup v2), or None."""
    try:
        for line in Path("/sys/fs/cgroup/cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "throttled_usec":
                return int(value) / 1e3
    except (OSError, ValueError):
        pass
    return None


def main() -> None:
    size, variant, steps, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    device = torch.device("cuda")
    bench = prepare_bench(variant_spec(variant, size, seed_batch_size(size), steps, WARMUP), device)
    host, cpu, gcs = [], [], []
    started = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            gcs.append((info["generation"], (time.perf_counter() - started["t"]) * 1e3, len(host)))

    gc.callbacks.append(on_gc)
    batches = [b.to(device) for b in bench.batches]
    for batch in batches[:WARMUP]:
        bench.step(batch)
    torch.cuda.synchronize()
    if mode in ("freeze", "disable"):
        gc.collect()
        gc.freeze()
    if mode == "disable":
        gc.disable()
    timed = batches[WARMUP:]
    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(timed) + 1)]
    mem0, ticks0, throttled0 = torch.cuda.memory_stats(), thread_ticks(), throttled_ms()
    t0, cpu0 = time.perf_counter(), time.thread_time() * 1e3
    for i, batch in enumerate(timed):
        events[i].record()
        bench.step(batch)
        host.append((time.perf_counter() - t0) * 1e3)
        cpu.append(time.thread_time() * 1e3)
    events[-1].record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    mem1, ticks1, throttled1 = torch.cuda.memory_stats(), thread_ticks(), throttled_ms()
    busy = {k: v - ticks0.get(k, 0) for k, v in ticks1.items() if v > ticks0.get(k, 0)}
    last_cpu = thread_cpus()
    gpu = [events[i].elapsed_time(events[i + 1]) for i in range(len(timed))]
    result = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "size": size, "variant": variant,
        "mode": mode, "wall_ms_per_step": wall / len(timed), "median_gpu": statistics.median(gpu),
        "gpu_ms": [round(x, 2) for x in gpu], "host_ms": [round(b - a, 2) for a, b in zip([0.0] + host, host)],
        "cpu_ms": [round(b - a, 2) for a, b in zip([cpu0] + cpu, cpu)],
        "threads_ticks": busy,
        "cpus": {"allowed": sorted(os.sched_getaffinity(0)), "last": {k: last_cpu.get(k) for k in busy}},
        "cgroup_throttled_ms": None if throttled0 is None else throttled1 - throttled0,
        "n": [int((b.labels >= 0).sum()) for b in timed], "gcs": gcs,
        "mem": {k: mem1.get(k, 0) - mem0.get(k, 0) for k in ALLOCATOR},
    }
    print(json.dumps({k: result[k] for k in ("size", "variant", "mode", "wall_ms_per_step", "median_gpu",
                                             "threads_ticks", "cpus", "cgroup_throttled_ms", "mem")}))
    out = Path(os.environ.get("OUT", "."))
    (out / f"diag_{size}_{variant}_{mode}.json").write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
