r"""What each new process pays before it trains: compile with an empty cache, then from the cache.

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
  the first process with the same overrides (`losses`: the two; `loss_rel_diff`: how far apart);
- `caches`: the process's hits and misses in inductor's FX graph cache and AOTAutograd's cache
  (`cache_bypass_reasons`: why AOTAutograd's did not cache a graph), and `phases_s`: its longest
  compile phases (dynamo's timers), which say where a slow start went.
The first process of each wrapper starts cold; the rest find the cache warm. `--trials` gives each
process its own config overrides, as the trials of a search differ (process n takes the n-th,
cycling): whether the cache still covers a trial whose dropout, learning rate or weight decay is
new.

    python benchmarks/compile_start.py --device cpu --processes 4 \
        --trials "model.dropout=0.1 optim.lr=1e-3 optim.weight_decay=0.01" \
                 "model.dropout=0.2 optim.lr=2e-3 optim.weight_decay=0.05"

`--profile-dir DIR` runs each process's preparation and first two steps under cProfile (the rows keep
its 40 longest calls; they do not count in `--summarize`). `--isa-checks` gives the C++ wrapper on a
GPU back inductor's CPU-ISA checks, which every process paid before 3bd5dc7 (rows `cpp_isa_checks`):

    python benchmarks/compile_start.py --device cuda --size 130M --num-items 159750 --batch-size 256 \
        --wrappers on --isa-checks --processes 3

`--aot-bypass` gives back AOTAutograd's cache bypass of graphs with a custom autograd.Function
(the step's `TiedItemTable`), as before `tuner.train.step.AOT_CACHE_SETTINGS` (rows `<wrapper>_aot_bypass`).
`--sdpa-unmarked` leaves SDPA's backend-pinning functions unmarked in inductor's cacheable
functions, as before `tuner.train.step.SDPA_PIN_FUNCTIONS` (rows `<wrapper>_sdpa_unmarked`): with a
trial on a pinned SDPA kernel (`--trials model.attention=efficient`), AOTAutograd's cache passes
over the step in every process:

    python benchmarks/compile_start.py --device cuda --size 130M --num-items 159750 --batch-size 256 \
        --wrappers off --processes 2 --trials model.attention=efficient --sdpa-unmarked

`--summarize FILE...` runs nothing: it prints the medians over earlier runs' files, and with
`--step-files` (gpu_throughput.py files with alternating `amp_compile` and
`amp_compile_python_wrapper` rows) after how many steps the C++ wrapper's faster steps make up its
longer start on a warm cache, the bar of `train.cpp_wrapper=auto`:

    python benchmarks/compile_start.py --summarize \
        benchmarks/results/compile_start_cuda/compile_start_130M_{cpp,cpp_counters,python,python_counters,python_same_run}.json \
        --step-files benchmarks/results/gpu_throughput_cpp_wrapper_130M_8f4ad8c.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def child(spec_json: str, launched: float, profile: str | None = None, isa_checks: bool = False,
          aot_bypass: bool = False, sdpa_unmarked: bool = False) -> None:
    """One process: prepare the `tuner bench` step, time the first two steps and the next ones.
    With `profile` (a file name), cProfile runs from the model's preparation to the end of the first
    two steps; its summary goes to that file and its longest calls into the row (`profile_top`).
    `isa_checks`: the C++ wrapper on a GPU as before 3bd5dc7, with inductor's CPU-ISA checks.
    `aot_bypass`: AOTAutograd's cache passes over the step (its custom autograd.Function), as
    before `tuner.train.step.AOT_CACHE_SETTINGS`. `sdpa_unmarked`: SDPA's backend-pinning functions
    are not marked cacheable, as before `tuner.train.step.SDPA_PIN_FUNCTIONS`."""
    import torch

    import tuner.train.step as step_module
    from tuner.bench import BenchSpec, prepare_bench

    if isa_checks:
        step_module.CUDA_CPP_WRAPPER = {"cpp_wrapper": True}
    if aot_bypass:
        step_module.AOT_CACHE_SETTINGS = {}
    if sdpa_unmarked:
        step_module.SHARED_CACHE_SETTINGS = step_module.without_sdpa_marks(step_module.SHARED_CACHE_SETTINGS)

    spec = BenchSpec(**json.loads(spec_json))
    device = torch.device(spec.device)
    bypasses = watch_bypasses()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    bench = prepare_bench(spec, device)
    batches = [b.to(device) for b in bench.batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    losses = [float(bench.step(b)) for b in batches[:2]]
    sync()
    first = time.perf_counter() - t0
    start = time.time() - launched
    top = []
    if profiler is not None:
        profiler.disable()
        top = write_profile(profiler, Path(profile))
    times = []
    for b in batches[2:]:
        t = time.perf_counter()
        bench.step(b)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"start_s": start, "first_steps_s": first, "step_ms": statistics.median(times),
                      "losses": losses, "caches": cache_counts(), "phases_s": compile_phases(),
                      "cache_bypass_reasons": sorted(set(bypasses)), **({"profile_top": top} if top else {})}))


def write_profile(profiler, path: Path, top: int = 120) -> list[str]:
    """The profile's functions by cumulative time, then by own time; what loading a compiled module
    calls; and who called subprocesses, file locks and waits (where a cached compile may still wait on
    a compiler). Returns the 40 calls of most cumulative time as "seconds calls function" lines, for
    the row: a result file comes back from a GPU machine where a folder of profiles may not."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    calls = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:40]  # (file, line, name) -> (cc, nc, tt, ct, ...)
    lines = [f"{ct:8.2f} s {nc:6d} {Path(file).name}:{line}({name})" for (file, line, name), (_, nc, _, ct, _) in calls]
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top // 2)
    stats.sort_stats("cumulative").print_callees(r"\(load_by_key_path\)|\(load_pybinding\)|\(load_async\)|\(load_fn\)")
    stats.print_callers(r"subprocess.py:\d+\(run\)|subprocess.py:\d+\(communicate\)|_filelock|\(wait\)|\(result\)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    return lines


def watch_bypasses() -> list[str]:
    """A list that fills with the first line of each reason AOTAutograd's cache gives (in its log)
    for not caching a graph."""
    import logging

    from torch._functorch._aot_autograd import autograd_cache

    reasons: list[str] = []

    class Reasons(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Bypassing autograd cache due to: "):
                reasons.append(message.split(": ", 1)[1].splitlines()[0].strip())

    autograd_cache.log.addHandler(Reasons())
    autograd_cache.log.setLevel(logging.INFO)
    autograd_cache.log.propagate = False  # the reasons go to the row, not to stderr
    return reasons


def cache_counts() -> dict:
    """Inductor's FX graph cache and AOTAutograd's cache: hits, misses and bypasses in this process."""
    from torch._dynamo.utils import counters

    wanted = {"inductor": "fxgraph_cache_", "aot_autograd": "autograd_cache_"}
    return {key: n for group, prefix in wanted.items() for key, n in counters[group].items() if key.startswith(prefix)}


def compile_phases(top: int = 10) -> dict:
    """The compile's longest phases in this process (dynamo's timers, seconds; they nest)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    phases = sorted(zip(names, map(float, values)), key=lambda kv: -kv[1])[:top]
    return {name: round(value, 2) for name, value in phases}


def summarize(files: list[str], step_files: list[str]) -> dict:
    """Medians over the rows of earlier runs' files, per wrapper and cache state: seconds to the end
    of the first two steps, of them in loading compiled code (`PyCodeCache.load_by_key_path`), and
    the steady step; `details`: what the rows that record their compile say (`phase_details`);
    `aot_cache`: AOTAutograd's cache hits, misses and bypasses summed over the rows (a bypass: the
    process traced the step's joint graph again). Wrappers as the rows name them (python, cpp, and
    the controls: `_aot_bypass`, `_sdpa_unmarked`, `cpp_isa_checks`), in the order they first come.
    With `step_files` (gpu_throughput.py results with alternating `amp_compile` and
    `amp_compile_python_wrapper` rows of one size): the steps after which a trial on a warm cache
    makes up the C++ wrapper's longer start, from the median steps of those rows (0 if its start is
    no longer)."""
    # rows run under cProfile (--profile-dir) are left out: their start includes the profiler's overhead
    rows = [row for f in files for row in _rows(f) if "error" not in row and not row.get("profiled")]
    table, details, aot = {}, {}, {}
    for wrapper in dict.fromkeys(r["wrapper"] for r in rows):
        for cache in ("cold", "warm"):
            got = [r for r in rows if r["wrapper"] == wrapper and r["cache"] == cache]
            if got:
                # None where the phase was not among a row's longest (the Python wrapper's ~1 s)
                loads = [r["phases_s"]["PyCodeCache.load_by_key_path"] for r in got
                         if "PyCodeCache.load_by_key_path" in r.get("phases_s", {})]
                table[f"{wrapper}_{cache}"] = {
                    "n": len(got), "start_s": statistics.median(r["start_s"] for r in got),
                    "first_steps_s": statistics.median(r["first_steps_s"] for r in got),
                    "load_by_key_path_s": statistics.median(loads) if loads else None,
                    "step_ms": statistics.median(r["step_ms"] for r in got)}
                details[f"{wrapper}_{cache}"] = phase_details(got, len(loads))
                aot[f"{wrapper}_{cache}"] = {
                    kind: sum(r.get("caches", {}).get(f"autograd_cache_{kind}", 0) for r in got)
                    for kind in ("hit", "miss", "bypass")}
    summary = {"files": files, "medians": table, "details": details, "aot_cache": aot,
               "loss_rel_diff": repeat_differences(files)}
    if step_files:
        if not ("cpp_warm" in table and "python_warm" in table):
            raise ValueError("the break-even needs warm processes of both wrappers in the files")
        steps = [r for f in step_files for r in _rows(f)]
        cpp = [r["step_ms"] for r in steps if r.get("variant") == "amp_compile"]
        python = [r["step_ms"] for r in steps if r.get("variant") == "amp_compile_python_wrapper"]
        if not cpp or not python:
            raise ValueError("the --step-files have no amp_compile and amp_compile_python_wrapper rows to compare")
        cpp, python = statistics.median(cpp), statistics.median(python)
        extra_s = table["cpp_warm"]["start_s"] - table["python_warm"]["start_s"]
        # 0 where the C++ wrapper's warm start is no longer: it is ahead from the first step
        summary["break_even"] = {"step_files": step_files, "cpp_step_ms": cpp, "python_step_ms": python,
                                 "warm_start_extra_s": extra_s,
                                 "steps": max(extra_s, 0.0) / ((python - cpp) / 1e3) if python > cpp else None}
    return summary


def phase_details(rows: list[dict], load_rows: int) -> dict:
    """What the rows that record their compile (`phases_s`, `caches`) say beyond the medians: how
    many there are, the range of their shortest listed phase (a phase not listed took less), of
    tracing the joint graph, and the FX graph cache's misses in all of them."""
    phased = [r["phases_s"] for r in rows if "phases_s" in r]
    traces = [ph["aot_trace_joint_graph"] for ph in phased if "aot_trace_joint_graph" in ph]
    counted = [r["caches"] for r in rows if "caches" in r]
    span = lambda values: [min(values), max(values)] if values else None  # noqa: E731
    return {"rows_with_phases": len(phased), "rows_with_load_phase": load_rows,
            "shortest_listed_phase_s": span([min(ph.values()) for ph in phased]),
            "trace_joint_graph_s": span(traces), "rows_with_caches": len(counted),
            "fxgraph_cache_misses": sum(c.get("fxgraph_cache_miss", 0) for c in counted),
            "fxgraph_cache_hits": sum(c.get("fxgraph_cache_hit", 0) for c in counted)}


def _rows(path: str) -> list[dict]:
    """The rows of a result file; ValueError if it is not one."""
    try:
        rows = json.loads(Path(path).read_text()).get("rows")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a result file ({type(e).__name__})") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path} is not a result file (no rows)")
    return rows


def repeat_differences(files: list[str]) -> dict:
    """Per step: the largest relative difference between the losses of a process and those of the
    first process of its file with the same wrapper and trial (rows that record `losses`)."""
    worst: dict = {}
    for f in files:
        first: dict = {}
        for row in _rows(f):
            if "losses" not in row:
                continue
            key = (row["wrapper"], row["trial"])
            if key in first:
                for i, diff in enumerate(rel_diffs(row["losses"], first[key])):
                    worst[f"step_{i + 1}"] = max(worst.get(f"step_{i + 1}", 0.0), diff)
            first.setdefault(key, row["losses"])
    return worst


def rel_diffs(losses: list[float], first: list[float]) -> list[float]:
    """Per step: |loss - first| / |first|."""
    return [abs(a - b) / abs(b) for a, b in zip(losses, first)]


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
    parser.add_argument("--summarize", nargs="+", metavar="FILE", help="medians over earlier runs' files; runs nothing")
    parser.add_argument("--step-files", nargs="*", default=[], metavar="FILE",
                        help="with --summarize: gpu_throughput.py files for the break-even number of steps")
    parser.add_argument("--profile-dir", metavar="DIR",
                        help="run each process's preparation and first two steps under cProfile and write its "
                             "summary to DIR/<wrapper>_<process>.txt (its start_s then includes cProfile's overhead)")
    parser.add_argument("--isa-checks", action="store_true",
                        help="the C++ wrapper on a GPU with inductor's CPU-ISA checks, as before 3bd5dc7 "
                             "(rows: wrapper cpp_isa_checks), to measure what skipping them saves")
    parser.add_argument("--aot-bypass", action="store_true",
                        help="AOTAutograd's cache without custom autograd.Functions, as before "
                             "tuner.train.step.AOT_CACHE_SETTINGS (rows: wrapper <name>_aot_bypass)")
    parser.add_argument("--sdpa-unmarked", action="store_true",
                        help="SDPA's backend-pinning functions not marked cacheable, as before "
                             "tuner.train.step.SDPA_PIN_FUNCTIONS (rows: wrapper <name>_sdpa_unmarked)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", help=argparse.SUPPRESS)
    parser.add_argument("--child-isa-checks", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-aot-bypass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-sdpa-unmarked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.launched, args.child_profile, args.child_isa_checks, args.child_aot_bypass,
              args.child_sdpa_unmarked)
        return
    if args.summarize:
        missing = [f for f in args.summarize + args.step_files if not Path(f).is_file()]
        if missing:
            sys.exit(f"compile_start.py: no such file: {missing[0]}")
        try:
            print(json.dumps(summarize(args.summarize, args.step_files), indent=1))
        except (ValueError, KeyError) as e:
            sys.exit(f"compile_start.py: {e if isinstance(e, ValueError) else f'a row lacks {e}'}")
        return
    if args.processes < 1:
        sys.exit("compile_start.py: --processes must be at least 1")
    if args.isa_checks and args.device != "cuda":
        sys.exit("compile_start.py: --isa-checks is about the C++ wrapper on a GPU (--device cuda)")
    report = {"command": "python benchmarks/compile_start.py " + shlex.join(sys.argv[1:]), "device": args.device,
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
                name = "python" if wrapper == "off" else "cpp_isa_checks" if args.isa_checks else "cpp"
                name += "_aot_bypass" if args.aot_bypass else ""
                name += "_sdpa_unmarked" if args.sdpa_unmarked else ""
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec),
                       "--launched", repr(time.time())]
                if args.isa_checks:
                    cmd.append("--child-isa-checks")
                if args.aot_bypass:
                    cmd.append("--child-aot-bypass")
                if args.sdpa_unmarked:
                    cmd.append("--child-sdpa-unmarked")
                if args.profile_dir:
                    cmd += ["--child-profile", str(Path(args.profile_dir).resolve() / f"{name}_{n + 1}.txt")]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    # against the first process with the same overrides (None for that one); GPUs'
                    # reductions need not repeat bit for bit, so also how far apart
                    first = first_losses.get(trial)
                    row["same_losses_as_first"] = None if first is None else first == row["losses"]
                    row["loss_rel_diff"] = None if first is None else max(rel_diffs(row["losses"], first))
                    first_losses.setdefault(trial, row["losses"])
                row = {"wrapper": name, "process": n + 1, "cache": "cold" if n == 0 else "warm", "trial": trial,
                       **({"profiled": True} if args.profile_dir else {}), **row}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
