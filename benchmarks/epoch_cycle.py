"""Where an epoch's wall time goes: training, evaluation, checkpoint and reporting, alone and shared.

Runs `tuner train` (the real loop, the real data path) in subprocesses and reads the time stamp of each
per-epoch console line: the median gap between consecutive lines is the full cycle of an epoch
(train + validate + checkpoint + report), next to the loop's own `epoch_s` (training) and `eval_s`.
The first `--skip` epochs (compilation, CUDA-graph capture) are left out of every median.

Suites:
- `ml1m`: the MovieLens-1M trial of benchmarks/ml1m.yaml in a few variants (batch size, CUDA
  graphs), one process and four sharing the GPU as Tune's fractional trials do; the Ray Train path
  (`--workers 1`, a checkpoint reported every epoch) beside the bare loop.
- `checkpoint_writer`: the one-process loop writing a checkpoint every epoch, in line
  (`train.checkpoint_writer=inline`) against on a thread (`background`), alternating; `--device`.
- `defaults`: the trial a user gets without settings, since session 34 (the whole step as one CUDA
  graph, fixed batch shapes) against before (plain compile, `train.static_shapes=false`), at 130M,
  5M and 430M, and at 130M through Ray Train and as iLoRA.
- `ray_overhead`: issue 5's check: the 130M configuration (159,750 synthetic items) through
  `TorchTrainer` with one worker against the bare loop, same run.

    python benchmarks/epoch_cycle.py --suite ml1m --out OUT/epoch_ml1m.json
    python benchmarks/epoch_cycle.py --suite ray_overhead --out OUT/ray_overhead.json
    python benchmarks/epoch_cycle.py --suite defaults --epochs 6 --skip 2 --out OUT/defaults.json

Each row also keeps `gpu`: the GPU's median SM clock, power, peak temperature and utilisation
while it trained (`nvidia-smi` once a second, samples at >= 50% utilisation; null without a GPU),
so a row that trained slower shows whether the GPU itself ran slower.

Results are written after every variant, so a time limit keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from paths import ROOT, ml1m_default
from run_in import CONTAINERS

# the console line, a Ray worker's too: "epoch   3  at 12.41s  train_loss ..." (seconds since the loop began:
# Ray forwards worker output in batches, so arrival times would not do)
LINE = re.compile(r"(?:^|\s)epoch\s+(\d+)\s+at ([\d.]+)s\s+(train_loss .*)")

GRAPHS = ["--set", "train.static_shapes=true", "--set", "train.compile_mode=reduce-overhead"]
# plain compile, each batch as it comes: the default on a GPU before session 34 (train.static_shapes
# auto now turns on the step graph and fixed shapes on one GPU worker); a later GRAPHS overrides it
PLAIN = ["--set", "train.static_shapes=false"]


def container(name: str) -> list[str]:
    """The `runner` that puts a variant in run_in.py's container `name`."""
    return ["benchmarks/run_in.py", name, "--"]  # epoch_cycle runs tuner in the repository root


def suites(data: str, device: str = "cpu") -> dict[str, list[dict]]:
    ml1m = ["--data", data, "--config", "benchmarks/ml1m.yaml", "--set", "train.patience=0"]
    device = ["--device", device]
    synthetic = ["--synthetic-items", "159750", "--synthetic-users", "40000", "--set", "eval.max_val_users=2000"]
    sized = {size: ["--size", size, *synthetic, "--batch-size", "128" if size == "430M" else "256"]
             for size in ("5M", "130M", "430M")}
    big = sized["130M"] + PLAIN  # ray_overhead's rows: plain compile unless they add GRAPHS
    return {
        "ml1m": [
            {"name": "batch128", "args": ml1m},
            {"name": "batch128_graphs", "args": ml1m + GRAPHS},
            {"name": "batch128_x4", "args": ml1m, "copies": 4},
            {"name": "batch128_graphs_x4", "args": ml1m + GRAPHS, "copies": 4},
            {"name": "batch256_graphs_x4", "args": ml1m + GRAPHS + ["--batch-size", "256"], "copies": 4},
            {"name": "batch128_graphs_ray", "args": ml1m + GRAPHS + ["--workers", "1"]},
            # attention on SDPA's memory-efficient kernel, as at 200 positions before tiled_attention (session 24)
            {"name": "batch128_graphs_efficient", "args": ml1m + GRAPHS + ["--set", "model.attention=efficient"]},
            {"name": "batch128_graphs_cudnn", "args": ml1m + GRAPHS + ["--set", "model.attention=cudnn"]},
        ],
        # the one-process loop's checkpoint writer: in line against on a thread, every epoch written
        # (checkpoint_share=0), alternating; a 5M model over 100,000 items (a 144 MB checkpoint)
        "checkpoint_writer": [
            {"name": f"{writer}_{i}", "checkpoints": True,
             "args": ["--size", "5M", "--synthetic-items", "100000", "--synthetic-users", "400", "--batch-size", "128",
                      "--set", "train.checkpoint_share=0", "--set", f"train.checkpoint_writer={writer}",
                      "--set", "eval.max_val_users=200", *device]}
            for i in (1, 2) for writer in ("inline", "background")],
        "smoke": [  # the CPU check of this script
            {"name": "tiny_bare", "args": ["--device", "cpu"]},
            {"name": "tiny_ray_train", "args": ["--device", "cpu", "--workers", "1"]},
            *({"name": f"tiny_{c}", "args": ["--device", "cpu"], "runner": container(c)} for c in CONTAINERS),
        ],
        # the default trial before and since session 34 (train.static_shapes=auto, train.step_graph=auto):
        # each size bare, 130M also through Ray Train and as iLoRA
        "defaults": [
            *({"name": f"{size}_{when}", "args": sized[size] + extra}
              for size in ("130M", "5M", "430M") for when, extra in (("default", []), ("before", PLAIN))),
            *({"name": f"130M_{kind}_{when}", "args": sized["130M"] + more + extra}
              for kind, more in (("ray_train", ["--workers", "1"]), ("ilora", ["--ilora"]))
              for when, extra in (("default", []), ("before", PLAIN))),
        ],
        "ray_overhead": [
            {"name": "130M_bare", "args": big},
            {"name": "130M_ray_train", "args": big + ["--workers", "1"]},
            # a Ray worker runs with OMP_NUM_THREADS = its CPUs (1 here): the bare loop so limited
            {"name": "130M_bare_1thread", "args": big, "env": {"OMP_NUM_THREADS": "1"}},
            # the worker given 8 CPUs: Ray sets its OMP_NUM_THREADS to 8
            {"name": "130M_ray_train_cpus8", "args": big + ["--workers", "1", "--set", "resources.cpus_per_worker=8"]},
            # CUDA graphs: the step is one replay, so the host (Python, Ray's threads) no longer paces it
            {"name": "130M_bare_graphs", "args": big + GRAPHS},
            {"name": "130M_ray_train_graphs", "args": big + GRAPHS + ["--workers", "1"]},
            # Ray's own share: no checkpoint but the last one
            {"name": "130M_ray_train_no_ckpt",
             "args": big + ["--workers", "1", "--set", "train.checkpoint_every=1000"]},
            {"name": "130M_ray_train_ckpt4", "args": big + ["--workers", "1", "--set", "train.checkpoint_every=4"]},
            {"name": "130M_bare_again", "args": big},
            # inductor's wrapper in Python (train.cpp_wrapper=off), as before the C++ wrapper was the default
            {"name": "130M_bare_python_wrapper", "args": big + ["--set", "train.cpp_wrapper=off"]},
            {"name": "130M_ray_train_python_wrapper",
             "args": big + ["--workers", "1", "--set", "train.cpp_wrapper=off"]},
            # the C++ wrapper forced (auto left it off for trials this short in sessions 17-18; since 19 it is on)
            {"name": "130M_bare_cpp_wrapper", "args": big + ["--set", "train.cpp_wrapper=on"]},
            {"name": "130M_ray_train_cpp_wrapper", "args": big + ["--workers", "1", "--set", "train.cpp_wrapper=on"]},
            # Ray starts its workers at nice 15 (raylet's worker_niceness; RAY_worker_niceness sets it, read
            # when `tuner train` starts its local Ray): the Ray worker at nice 0, and the bare loop at 15
            {"name": "130M_ray_train_cpp_wrapper_nice0",
             "args": big + ["--workers", "1", "--set", "train.cpp_wrapper=on"], "env": {"RAY_worker_niceness": "0"}},
            {"name": "130M_bare_cpp_wrapper_nice15", "args": big + ["--set", "train.cpp_wrapper=on"],
             "prefix": ["nice", "-n", "15"]},
            # what of a Train worker slows the host-bound step (session 20): the bare loop on a second
            # thread, in a Ray task's main thread, on a second thread of a Ray task (run_in.py); Train
            # with the controller's default 2 s poll (the epoch's report then waits for a poll, so
            # compare the training part)
            *({"name": f"130M_{c}", "args": big, "runner": container(c)} for c in CONTAINERS),
            {"name": "130M_ray_train_poll2s", "args": big + ["--workers", "1"],
             "env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}},
        ],
    }


def run_copy(args: list[str], epochs: int, log: Path, env: dict[str, str] | None = None,
             prefix: list[str] | None = None, runner: list[str] | None = None,
             storage_root: Path | None = None, checkpoints: bool = False) -> dict:
    """One `tuner train` process (with `env` added to its environment, launched through `prefix`,
    e.g. `nice -n 15`, and run by `runner` in place of `-m tuner`: run_in.py's containers);
    per-epoch lines with their times. A Ray Train run's storage goes in `storage_root` (default:
    beside the log), and is removed once the run ends."""
    cmd = [*(prefix or []), sys.executable, *(runner or ["-m", "tuner"]), "train", "--max-epochs", str(epochs), *args]
    # Ray Train: a fresh run's storage (the same storage and name would resume); no --json, which
    # silences the worker's lines
    storage = (Path(storage_root or log.parent) / f"{log.stem}_ray") if "--workers" in args else None
    if storage:
        shutil.rmtree(storage, ignore_errors=True)
        cmd += ["--storage", str(storage)]
    else:
        cmd += ["--json"]
    # `checkpoints`: the bare loop writes checkpoints into a fresh folder (an old one would resume)
    ckpt = log.parent / f"{log.stem}_ckpt" if checkpoints and not storage else None
    if ckpt:
        shutil.rmtree(ckpt, ignore_errors=True)
        cmd += ["--checkpoint-dir", str(ckpt)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines, out = [], []
    for raw in proc.stdout:
        out.append(raw)
        match = LINE.search(raw)
        if match:
            fields = match.group(3).split()
            values = {k: float(v) for k, v in zip(fields[::2], fields[1::2])}
            lines.append({"epoch": int(match.group(1)), "t": float(match.group(2)), **values})
    proc.wait()
    log.write_text("".join(out))
    for folder in (storage, ckpt):  # the run's checkpoints: not needed once it ended, and large beside the logs
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    final = {}
    for raw in reversed(out):
        if raw.startswith("{"):
            final = json.loads(raw)
            break
    return {"rc": proc.returncode, "epochs": lines, "final": {k: final.get(k) for k in
            ("wall_s", "samples_per_s", "test_ndcg_10", "val_ndcg_10", "peak_mem_mb", "step_graph", "static_shapes")}}


GPU_QUERY = "clocks.sm,power.draw,temperature.gpu,utilization.gpu"


class GpuSampler:
    """`nvidia-smi` sampling the GPU's SM clock, power, temperature and utilisation once a second while
    a row runs, so a row that trained slower can be told apart by the GPU's own state (a lower clock:
    power or heat) from a slower host. A thread reads the samples as they come (a pipe left unread
    would fill and stop them); `summary()` keeps those at >= 50% utilisation (training, not start-up
    or compile); None where there is no nvidia-smi. GPU 0 only: the rows train on one GPU."""

    def __init__(self):
        self.lines: list[str] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "1000"], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def summary(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        self.reader.join(timeout=5)
        return gpu_summary("".join(self.lines))


def gpu_summary(text: str) -> dict | None:
    """Medians of `nvidia-smi` CSV samples (GPU_QUERY's fields) taken at >= 50% utilisation."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append([float(v) for v in line.split(",")])
        except ValueError:  # "[N/A]", a cut-off last line
            continue
    busy = [r for r in rows if len(r) == 4 and r[3] >= 50]
    if not busy:
        return None
    return {"busy_samples": len(busy), "sm_clock_mhz": statistics.median(r[0] for r in busy),
            "min_sm_clock_mhz": min(r[0] for r in busy), "power_w": statistics.median(r[1] for r in busy),
            "max_temperature_c": max(r[2] for r in busy), "utilization_pct": statistics.median(r[3] for r in busy)}


def summarize(copies: list[dict], skip: int) -> dict:
    def med(values):
        return statistics.median(values) if values else None

    per = []
    for c in copies:
        rows = list({e["epoch"]: e for e in c["epochs"] if e["epoch"] > skip}.values())  # Ray may echo a line
        gaps = [b["t"] - a["t"] for a, b in zip(rows, rows[1:])]
        # every epoch's training time too (the first: compile or cache load), so a row's spread is in the file
        first = next((e for e in c["epochs"] if e["epoch"] == 1), None)
        epochs_s = [e["epoch_s"] for e in rows if "epoch_s" in e]
        per.append({"first_epoch_s": first.get("epoch_s") if first else None, "epochs_s": epochs_s,
                    "cycle_s": med(gaps), "cycle_mean_s": sum(gaps) / len(gaps) if gaps else None,
                    "epoch_s": med(epochs_s),
                    "eval_s": med([e.get("eval_s") for e in rows if "eval_s" in e]),
                    "samples_per_s": med([e.get("samples_per_s") for e in rows if "samples_per_s" in e]),
                    "rc": c["rc"], "final": c["final"]})
    cycles = [p["cycle_s"] for p in per if p["cycle_s"]]
    return {"copies": per, "cycle_s": med(cycles),
            "cycle_mean_s": med([p["cycle_mean_s"] for p in per if p["cycle_mean_s"]]),
            "epoch_s": med([p["epoch_s"] for p in per if p["epoch_s"]]),
            "eval_s": med([p["eval_s"] for p in per if p["eval_s"]]),
            "epochs_per_s_total": sum(1 / c for c in cycles) if cycles else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("ml1m", "ray_overhead", "smoke", "checkpoint_writer", "defaults"),
                        required=True)
    parser.add_argument("--device", default="cpu", help="checkpoint_writer's device (cpu or cuda)")
    parser.add_argument("--data", default=ml1m_default())
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3, help="leading epochs left out (compile, warm-up)")
    parser.add_argument("--only", nargs="*",
                        help="variant names to run, in this order; a name given twice runs twice (default: all)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--logs", help="folder for the runs' output (default: beside --out)")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs or out.parent)
    logs.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__, "suite": args.suite, "epochs": args.epochs,
              "skip": args.skip, "command": "python benchmarks/epoch_cycle.py " + " ".join(sys.argv[1:]),
              "rows": []}
    variants = suites(args.data, args.device)[args.suite]
    by_name = {v["name"]: v for v in variants}
    unknown = [name for name in args.only or [] if name not in by_name]
    if unknown:
        sys.exit(f"epoch_cycle.py: no variant {unknown[0]!r} in suite {args.suite} (it has {', '.join(by_name)})")
    for variant in [by_name[name] for name in args.only] if args.only else variants:
        n = variant.get("copies", 1)
        tag = f"{len(result['rows']) + 1:02d}_{variant['name']}"  # a variant may run twice: its logs are kept apart
        copies: list[dict] = [{}] * n
        t0 = time.time()

        def go(i: int, v=variant) -> None:
            copies[i] = run_copy(v["args"], args.epochs, logs / f"{out.stem}_{tag}_{i}.log", v.get("env"),
                                 v.get("prefix"), v.get("runner"), checkpoints=v.get("checkpoints", False))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        sampler = GpuSampler()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gpu = sampler.summary()
        row = {"name": variant["name"], "copies_run": n, "args": " ".join(variant["args"]),
               "env": variant.get("env", {}),
               **({"prefix": " ".join(variant["prefix"])} if "prefix" in variant else {}),
               **({"runner": " ".join(variant["runner"])} if "runner" in variant else {}),
               **({"checkpoint_dir": "a fresh folder per run"} if variant.get("checkpoints") else {}),
               "wall_s": time.time() - t0, **summarize(copies, args.skip), "gpu": gpu}
        result["rows"].append(row)
        for i, c in enumerate(row["copies"]):
            if c["rc"] != 0 or c["cycle_s"] is None:  # say why, here: logs may not travel back
                log = (logs / f"{out.stem}_{tag}_{i}.log").read_text().splitlines()
                row.setdefault("errors", []).append(log[-3:])
                print("\n".join(log[-15:]), file=sys.stderr)
        print(json.dumps({k: row[k] for k in ("name", "cycle_s", "cycle_mean_s", "epoch_s", "eval_s",
                                              "epochs_per_s_total", "wall_s")}), flush=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
