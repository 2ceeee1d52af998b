"""Issue 10's result file from the runs of one multi-GPU machine: DDP scaling and tuning across GPUs.

    python benchmarks/multigpu_report.py \\
        --scaling benchmarks/results/multigpu_runs/4xH200_1gpu.json benchmarks/results/multigpu_runs/4xH200_4gpu.json \\
        --tune benchmarks/results/ml1m_runs/4xH200_concurrent.json benchmarks/results/ml1m_runs/4xH200_ddp.json \\
        --out benchmarks/results/multigpu.json

`--scaling` takes outputs of `benchmarks/multigpu.py` made on one machine (one call: a row's
scaling efficiency is taken against the plain 1-GPU row of its size among these files, never
against another machine's; a 1-GPU row under DDP, `--ddp-single`, gets one too). `--tune` takes
`benchmarks/ml1m.py run` records of searches with the same search space and seed on the same
machine, one after another: the best validation NDCG@10 each had reached by each second of its
wall clock, how long each took to reach the level that all of them reached, and the epoch time
and best validation NDCG@10 of a configuration every search tried (TPE's first draw, with the
same seed): one 1-GPU trial against one DDP trial of the same settings.
Prints the Markdown tables the README shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ml1m import best_so_far

RESULTS = Path(__file__).resolve().parent / "results"


def scaling(files: list[Path]) -> dict:
    """Rows of every file, with efficiency = samples/s / (GPUs x samples/s of the 1-GPU row)."""
    runs = [json.loads(f.read_text()) for f in files]
    devices = {r["device"].split(" x ", 1)[-1] for r in runs}
    if len(devices) != 1:
        sys.exit(f"multigpu_report.py: --scaling files come from different GPUs ({', '.join(sorted(devices))})")
    rows = [dict(row, bucket_cap_mb=run.get("bucket_cap_mb", 25), gradient_as_bucket_view=run.get(
        "gradient_as_bucket_view", False), compile=run["compile"],
        ddp=row["gpus"] > 1 or run.get("ddp_at_1_gpu", False)) for run in runs for row in run["rows"]]
    rows.sort(key=lambda r: (-float(r["size"].rstrip("M")) if r["size"][:-1].isdigit() else 0, r["gpus"], r["ddp"]))
    for row in rows:
        base = next((b for b in rows if b["size"] == row["size"] and b["gpus"] == 1 and not b["ddp"]), None)
        row["scaling_efficiency"] = (row["samples_per_s"] / (row["gpus"] * base["samples_per_s"])
                                     if base and row is not base else None)
    return {"device": max((r["device"] for r in runs), key=len), "torch": runs[0]["torch"],
            "nccl_nvls_enable": runs[0]["nccl_nvls_enable"], "num_items": runs[0]["num_items"],
            "seq_len": runs[0]["seq_len"], "commands": [r["command"] for r in runs], "rows": rows}


def _improvements(record: dict) -> list[tuple[float, float]]:
    """(seconds since the search started, best validation NDCG@10 so far) at each improvement."""
    points = best_so_far(record)
    return [p for i, p in enumerate(points) if i == 0 or p[1] > points[i - 1][1]]


def _first_by_params(trials: list[dict]) -> dict[str, dict]:
    """Each configuration's first trial, keyed by its settings."""
    first: dict[str, dict] = {}
    for t in trials:
        first.setdefault(json.dumps(t["params"], sort_keys=True), t)
    return first


def _seconds_per_epoch(trial: dict) -> float | None:
    e = trial["epochs"]
    gaps = [(b[2] - a[2]) / (b[0] - a[0]) for a, b in zip(e, e[1:]) if b[0] > a[0]]
    return statistics.median(gaps) if len(gaps) >= 5 else None


def slot_gaps(trials: list[dict]) -> list[float]:
    """Seconds from one trial's last epoch to the first epoch of the trial that took its place
    (Tune stopping the old trial, starting the new one's processes, compiling): the GPU idles."""
    first_wave = min(t["epochs"][0][2] for t in trials if t["epochs"])
    ends = sorted(t["epochs"][-1][2] for t in trials if t["epochs"])
    gaps = []
    for t in sorted((t for t in trials if t["epochs"] and t["start"] > first_wave), key=lambda t: t["start"]):
        freed = next((e for e in ends if e <= t["start"]), None)
        if freed is not None:
            ends.remove(freed)
            gaps.append(round(t["epochs"][0][2] - freed, 1))
    return gaps


def tune(files: list[Path]) -> dict:
    """Best validation NDCG@10 against wall time for each search, and the level all reached."""
    records = [json.loads(f.read_text()) for f in files]
    curves = {r["name"]: _improvements(r) for r in records}
    common = min(c[-1][1] for c in curves.values())  # the best that every search reached
    # a configuration every search tried (TPE's first draw, with the same seed): its epoch time
    # compares one trial's speed across the layouts
    settings = [_first_by_params(r["trials"]) for r in records]
    shared = sorted(set.intersection(*(set(by_params) for by_params in settings)))
    rows = []
    for r, by_params in zip(records, settings):
        same = [by_params[shared[0]]] if shared else []
        c = curves[r["name"]]
        words = r["command"].split()
        rows.append({
            "search": r["name"], "device": r["device"], "budget_s": r["budget_s"], "wall_s": round(r["wall_s"], 1),
            "settings": [words[i + 1] for i, w in enumerate(words) if w == "--set"],
            "trials": len(r["trials"]),
            "trials_stopped_early": sum(t["outcome"] == "stopped_early" for t in r["trials"]),
            "trial_epochs": sum(len(t["epochs"]) for t in r["trials"]),
            "shared_config_s_per_epoch": _seconds_per_epoch(same[0]) if same else None,
            "shared_config_best_val": max((v for _, v, _ in same[0]["epochs"]), default=None) if same else None,
            "shared_config": json.loads(shared[0]) if shared else None,
            "first_trial_started_s": round(min(t["start"] for t in r["trials"]) - r["started_at"], 1),
            # the trial's MLflow run opens once its worker has started; then compile and CUDA graphs
            "run_start_to_first_epoch_s": round(statistics.median(t["epochs"][0][2] - t["start"] for t in r["trials"]
                                                                  if t["epochs"]), 1),
            "slot_idle_s": slot_gaps(r["trials"]),
            "best_val_ndcg_10": c[-1][1], "best_reached_s": round(c[-1][0], 1),
            "common_level_reached_s": round(next(t for t, v in c if v >= common), 1),
            "test_ndcg_10_of_best": r["summary"].get("test_ndcg_10"),
            "code_commit": r.get("code_commit"), "command": r["command"],
            "best_val_by_time": [[round(t, 1), v] for t, v in c],
        })
    return {"common_level": common, "rows": rows}


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(result: dict) -> str:
    s = result["scaling"]
    lines = [f"Device: {s['device']}, NCCL_NVLS_ENABLE={s['nccl_nvls_enable']}, torch {s['torch']}; catalog "
             f"{s['num_items']:,}, sequence {s['seq_len']}, bf16 + compile, per-GPU batch fixed; one machine, "
             "one call.", "",
             "| size | GPUs | batch per GPU | DDP buckets | ms/step | samples/s | scaling efficiency | ranks agree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        eff = f"{100 * r['scaling_efficiency']:.0f}%" if r["scaling_efficiency"] else "-"
        buckets = ("no DDP" if not r["ddp"]
                   else f"{r['bucket_cap_mb']:g} MB" + (", views" if r["gradient_as_bucket_view"] else ""))
        lines.append(f"| {r['size']} | {r['gpus']} | {r['batch_per_gpu']} | {buckets} | {r['step_ms']:.1f} | "
                     f"{r['samples_per_s']:,.0f} | {eff} | {'yes' if r['ranks_agree'] else 'NO'} |")
    t = result.get("tune")
    if t:
        lines += ["", f"Tuning on the same machine (`{t['rows'][0]['device']}`); level every search reached: "
                  f"validation NDCG@10 {t['common_level']:.4f}.", "",
                  "| search | budget s | trials (stopped by ASHA) | trial-epochs | shared config: s/epoch, best val | "
                  f"reached {t['common_level']:.4f} at s | best val NDCG@10 (at s) | test NDCG@10 of best | "
                  "slot idle between trials, s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            lines.append(f"| {r['search']}: {' '.join(r['settings'])} | {r['budget_s']:g} | {r['trials']} "
                         f"({r['trials_stopped_early']}) | {r['trial_epochs']} | "
                         f"{_num(r['shared_config_s_per_epoch'], 3)}, {_num(r['shared_config_best_val'], 4)} | "
                         f"{r['common_level_reached_s']:.1f} | {r['best_val_ndcg_10']:.4f} "
                         f"({r['best_reached_s']:.1f}) | {r['test_ndcg_10_of_best']:.4f} | "
                         f"{', '.join(f'{g:.0f}' for g in r['slot_idle_s']) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling", type=Path, nargs="+", required=True, help="benchmarks/multigpu.py outputs")
    parser.add_argument("--tune", type=Path, nargs="*", default=[], help="benchmarks/ml1m.py run records")
    parser.add_argument("--out", type=Path, default=RESULTS / "multigpu.json")
    parser.add_argument("--note", action="append", default=[], help="a line kept in the result (repeatable)")
    args = parser.parse_args()
    missing = [str(f) for f in args.scaling + args.tune if not f.is_file()]
    if missing:
        sys.exit(f"multigpu_report.py: no such file: {', '.join(missing)}")
    result = {"scaling": scaling(args.scaling), **({"tune": tune(args.tune)} if args.tune else {}),
              "notes": args.note}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(tables(result))


if __name__ == "__main__":
    main()
