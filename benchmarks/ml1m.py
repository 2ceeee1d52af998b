"""MovieLens-1M: the whole service (Ray Tune + Optuna + ASHA + MLflow) on one GPU, and the
tuning-efficiency comparison against random search without early stopping.

Two steps, so the GPU machine only runs and this machine draws:

    # on the GPU machine (each search on its own GPU, or one after the other on one GPU)
    python benchmarks/ml1m.py run --name asha --out OUT/asha --budget 480
    python benchmarks/ml1m.py run --name random --search random --scheduler none --out OUT/random --budget 480
    # the winner refitted on the validation items too (registered instead; its test metrics in "refit")
    python benchmarks/ml1m.py run --name asha --out OUT/asha --budget 420 --set tune.refit=true
    # anywhere: benchmarks/results/ml1m.json, benchmarks/results/ml1m_tuning.png, a Markdown table
    python benchmarks/ml1m.py render OUT/asha OUT/random
    # the committed runs: python benchmarks/ml1m.py render benchmarks/results/ml1m_runs/{asha,random}.json
    # the second round (wider learning rate, refit): python benchmarks/ml1m.py render --lead asha_refit \
    #     --prefix ml1m_lr benchmarks/results/ml1m_runs/asha_refit.json
    # the third round (schedule length searched, refit; run with --budget 390 --search-space
    #     search_spaces/ml1m_schedule.yaml --set tune.refit=true): python benchmarks/ml1m.py render \
    #     --lead sched_refit --prefix ml1m_schedule benchmarks/results/ml1m_runs/sched_refit.json
    # the fourth round (last-item masking searched; --budget 480 --search-space
    #     search_spaces/ml1m_last.yaml): python benchmarks/ml1m.py render --lead last --prefix ml1m_last \
    #     benchmarks/results/ml1m_runs/last.json
    # the fifth round (random windows of long histories; --budget 480 --search-space
    #     search_spaces/ml1m_window.yaml, then the same with --set tune.seed=1), which leads
    #     ml1m.json, with the first round's comparison kept: python benchmarks/ml1m.py render --lead window \
    #     --compare asha,random benchmarks/results/ml1m_runs/{window,window_seed1,asha,random}.json

`run` calls `tuner tune` with benchmarks/ml1m.yaml (fixed settings) and search_spaces/ml1m.yaml
(what is searched) under a wall-clock budget, then reads every trial's per-epoch validation
NDCG@10 with its timestamp back from the MLflow store into `run.json`. Data: the ML-1M copy in
../shared/data/ml-1m (never committed; pass --data to read it from elsewhere).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from paths import ROOT, ml1m_default

RESULTS = ROOT / "benchmarks" / "results"
# Full-ranking leave-one-out on the complete ML-1M (the shared copy lacks each user's last two
# interactions, so ours are close to, not identical with, these protocols)
ANCHORS = [
    {"model": "BERT4Rec (Petrov & Macdonald 2022; Klenitskiy & Vasilev 2023)", "ndcg_10": [0.1516, 0.1537],
     "hr_10": [0.2821, 0.2843]},
    {"model": "SASRec + full cross-entropy (Klenitskiy & Vasilev 2023)", "ndcg_10": [0.1821], "hr_10": [0.3152]},
]


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    experiment = f"ml1m-{args.name}"
    cmd = [sys.executable, "-m", "tuner", "tune", "--data", str(args.data), "--config", "benchmarks/ml1m.yaml",
           "--search-space", args.search_space, "--search", args.search, "--scheduler", args.scheduler,
           "--time-budget", str(args.budget), "--experiment", experiment, "--tracking-uri", uri,
           "--storage", str(Path(args.storage or f"/tmp/ray-{args.name}").resolve()), "--json"]
    for pair in args.set:
        cmd += ["--set", pair]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    (out / "tune.log").write_text(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"tuner tune failed ({proc.returncode}); see {out / 'tune.log'}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    record = {"name": args.name, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "command": " ".join(["python -m tuner"] + cmd[3:]), "wall_s": wall, "started_at": t0,
              "budget_s": args.budget, "summary": summary, "trials": trial_histories(uri, experiment),
              "parent_metrics": parent_metrics(uri, experiment)}
    (out / "run.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({k: summary.get(k) for k in ("num_trials", "best_val_ndcg_10", "test_ndcg_10", "test_hr_10")}))


# the settings any of the ML-1M search spaces searches: each trial's values go into the results
SEARCHED = ("optim.lr", "model.dropout", "optim.weight_decay", "train.mask_prob", "train.last_item_prob",
            "model.layers", "train.window_prob", "train.max_epochs", "optim.ema_decay")


def trial_histories(uri: str, experiment: str) -> list[dict]:
    """Per trial: its sampled parameters, outcome and (epoch, val_ndcg_10, unix time) rows."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    trials = []
    for r in client.search_runs([exp.experiment_id], max_results=5000):
        if r.data.tags.get("tuner.role") != "trial":
            continue
        history = sorted(client.get_metric_history(r.info.run_id, "val_ndcg_10"), key=lambda m: m.step)
        trials.append({"trial_id": r.data.tags.get("tuner.trial_id"), "outcome": r.data.tags.get("tuner.outcome"),
                       "start": r.info.start_time / 1000, "end": (r.info.end_time or 0) / 1000,
                       "params": {k: r.data.params[k] for k in SEARCHED if k in r.data.params},
                       "epochs": [[m.step, m.value, m.timestamp / 1000] for m in history]})
    return trials


def parent_metrics(uri: str, experiment: str) -> dict[str, float]:
    """What `tuner tune` logged on the parent run: the best trial's test and popularity metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`tuner.role` = 'parent'")
    return dict(runs[0].data.metrics) if runs else {}


def best_so_far(record: dict) -> list[tuple[float, float]]:
    """(seconds since the search started, best validation NDCG@10 so far) after each epoch of any
    trial, in time order."""
    events = sorted((t, v) for trial in record["trials"] for _, v, t in trial["epochs"])
    best, points = -1.0, []
    for t, v in events:
        best = max(best, v)
        points.append((t - record["started_at"], best))
    return points


def curves(record: dict) -> dict[str, list]:
    """Best validation NDCG@10 so far against GPU-minutes (the search's dedicated GPU, from the
    experiment's start) and against trial-epochs, over all epochs of all trials in time order."""
    points = best_so_far(record)
    return {"gpu_minutes": [s / 60 for s, _ in points], "trial_epochs": list(range(1, len(points) + 1)),
            "best_val_ndcg_10": [best for _, best in points]}


def best_at(curve: dict, axis: str, budget: float) -> float | None:
    seen = [y for x, y in zip(curve[axis], curve["best_val_ndcg_10"]) if x <= budget]
    return seen[-1] if seen else None


def render(args: argparse.Namespace) -> None:
    runs = [json.loads((Path(d) if Path(d).is_file() else Path(d) / "run.json").read_text()) for d in args.runs]
    by_name = {r["name"]: r for r in runs}
    main = by_name.get(args.lead, runs[0])
    s = main["summary"]
    best_trial = next(t for t in s["trials"] if t["trial_id"] == s["best_trial_id"])
    cfg_text = (ROOT / "benchmarks" / "ml1m.yaml").read_text()
    result = {
        "device": main["device"], "command": main["command"], "wall_s": round(main["wall_s"], 1),
        "time_budget_s": main["budget_s"], "dataset": "../shared/data/ml-1m/ml-1m.txt.gz (6,040 users, 3,416 items)",
        "protocol": "leave-one-out, full ranking of the catalog minus the user's history",
        "num_trials": s["num_trials"], "trials_completed": s["trials_completed"],
        "trials_stopped_early": s["trials_stopped_early"], "best_trial_epochs": best_trial["epochs"],
        "winning_config": {"searched": s["best_config"], "fixed": cfg_text},
        "best_val_ndcg_10": s["best_val_ndcg_10"],
        "test_ndcg_10": s.get("test_ndcg_10"), "test_hr_10": s.get("test_hr_10"),
        **({"refit": s["refit"]} if s.get("refit") else {}),  # run with --set tune.refit=true
        "anchors": ANCHORS,
    }
    result.update(_test_metrics(main))
    if len(runs) > 1:  # every run's winner, so a repeat's spread is beside the lead's figure
        result["runs"] = [{"name": r["name"], "command": r["command"], "code_commit": r.get("code_commit"),
                           "num_trials": r["summary"]["num_trials"],
                           "best_val_ndcg_10": r["summary"]["best_val_ndcg_10"],
                           "test_ndcg_10": r["summary"].get("test_ndcg_10"),
                           "test_hr_10": r["summary"].get("test_hr_10")}
                          for r in runs]
    unknown = set(args.compare or ()) - set(by_name)
    if unknown:
        sys.exit(f"--compare {' '.join(sorted(unknown))}: no such run among {', '.join(by_name)}")
    runs = [by_name[n] for n in args.compare] if args.compare else runs
    comparison = {}
    curve_by_name = {r["name"]: curves(r) for r in runs}
    if len(runs) > 1:
        common_epochs = min(c["trial_epochs"][-1] for c in curve_by_name.values() if c["trial_epochs"])
        common_minutes = min(c["gpu_minutes"][-1] for c in curve_by_name.values() if c["gpu_minutes"])
        marks = [m for m in (2, 4, 6, 8) if m < common_minutes] + [round(common_minutes, 2)]
        comparison = {
            "note": "each search on its own GPU of the same machine at the same time, same wall-clock budget",
            "trial_epoch_budget": common_epochs,
            "rows": [{"search": f"{r['name']} ({r['summary']['num_trials']} trials)", "device": r["device"],
                      "trial_epochs_total": curve_by_name[r["name"]]["trial_epochs"][-1],
                      "best_val_at_trial_epoch_budget": best_at(curve_by_name[r["name"]], "trial_epochs",
                                                                common_epochs),
                      **{f"best_val_at_{m}_gpu_min": best_at(curve_by_name[r["name"]], "gpu_minutes", m)
                         for m in marks},
                      "test_ndcg_10_of_best": r["summary"].get("test_ndcg_10")} for r in runs]}
        result["tuning_efficiency"] = comparison
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.prefix}.json").write_text(json.dumps(result, indent=1) + "\n")
    if len(runs) > 1:
        _plot(curve_by_name, RESULTS / f"{args.prefix}_tuning.png", main["device"])
    print(table(result))


def _test_metrics(record: dict) -> dict:
    """The best trial's test metrics (full ranking and sampled-100) from its MLflow parent run."""
    m = record.get("parent_metrics") or {}
    return {k: v for k, v in m.items() if k.startswith(("test_", "popularity_"))}


def _plot(curve_by_name: dict, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curve_by_name.items():
        label = {"asha": "Optuna TPE + ASHA", "random": "random search, no early stopping"}.get(name, name)
        axes[0].step(c["gpu_minutes"], c["best_val_ndcg_10"], where="post", label=label)
        axes[1].step(c["trial_epochs"], c["best_val_ndcg_10"], where="post", label=label)
    axes[0].set_xlabel(f"GPU-minutes ({device}, one GPU per search)")
    axes[1].set_xlabel("trial-epochs")
    for ax in axes:
        ax.set_ylabel("best validation NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("BERT4Rec on MovieLens-1M: tuning efficiency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _space(command: str) -> str:
    """The search space file a `tuner tune` command line names, and its seed if not the default."""
    words = command.split()
    space = words[words.index("--search-space") + 1] if "--search-space" in words else "search_spaces/ml1m.yaml"
    seed = next((w.split("=", 1)[1] for w in words if w.startswith("tune.seed=")), None)
    return f"`{space}`" + (f", tune.seed={seed}" if seed else "")


def table(result: dict) -> str:
    lines = [f"Device: {result['device']}; `{result['command']}` ({result['wall_s']:.0f} s wall, "
             f"{result['num_trials']} trials).", "",
             "| model | test NDCG@10 | test HR@10 | sampled-100 (uniform) NDCG@10 | sampled-100 (popularity) NDCG@10 |",
             "|---|---|---|---|---|",
             f"| ours: BERT4Rec tuned by `tuner tune` ({_space(result['command'])}) | "
             f"{result['test_ndcg_10']:.4f} | {result['test_hr_10']:.4f} | "
             f"{result.get('test_uni100_ndcg_10', float('nan')):.4f} | "
             f"{result.get('test_pop100_ndcg_10', float('nan')):.4f} |"]
    lead = result["command"]
    for r in result.get("runs", []):
        if r["command"] != lead and r["test_ndcg_10"] is not None:
            lines.append(f"| ours: run `{r['name']}` ({_space(r['command'])}) | {r['test_ndcg_10']:.4f} | "
                         f"{r['test_hr_10']:.4f} | - | - |")
    for a in result["anchors"]:
        lines.append(f"| {a['model']} | {'-'.join(f'{v:.4f}' for v in a['ndcg_10'])} | "
                     f"{'-'.join(f'{v:.4f}' for v in a['hr_10'])} | - | - |")
    eff = result.get("tuning_efficiency")
    if eff:
        keys = [k for k in eff["rows"][0] if k.startswith("best_val_at_")]
        lines += ["", "| search | trial-epochs run | "
                  + " | ".join(k.replace("best_val_at_", "best val @ ").replace("_", " ") for k in keys)
                  + " | test NDCG@10 of its best |",
                  "|---|---|" + "---|" * len(keys) + "---|"]
        for r in eff["rows"]:
            cells = " | ".join(f"{r[k]:.4f}" if r[k] is not None else "-" for k in keys)
            lines.append(f"| {r['search']} | {r['trial_epochs_total']} | {cells} | {r['test_ndcg_10_of_best']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=ml1m_default())
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--search", default="optuna", choices=("optuna", "random"))
    p.add_argument("--scheduler", default="asha", choices=("asha", "none"))
    p.add_argument("--storage")
    p.add_argument("--search-space", default="search_spaces/ml1m.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to tuner tune")
    p = sub.add_parser("render")
    p.add_argument("--lead", default="asha", help="the run whose winner the table shows")
    p.add_argument("--prefix", default="ml1m", help="writes results/PREFIX.json (and PREFIX_tuning.png for 2+ runs)")
    p.add_argument("--compare", type=lambda v: v.split(","), metavar="NAME,NAME",
                   help="the runs of the tuning-efficiency comparison (default: all, when there are two or more)")
    p.add_argument("runs", nargs="+", help="output folders of `run` or their run.json files (e.g. "
                                           "benchmarks/results/ml1m_runs/*.json; the one named asha leads)")
    args = parser.parse_args()
    if args.cmd == "run":
        if not Path(args.data).is_file():
            sys.exit(f"ML-1M not found at {args.data}; pass --data")
        run(args)
    else:
        render(args)


if __name__ == "__main__":
    main()
