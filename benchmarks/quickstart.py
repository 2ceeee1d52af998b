"""The README quickstart's main job, timed: `tuner tune` with no arguments in an empty folder.

    python benchmarks/quickstart.py --out benchmarks/results/quickstart.json

Records the wall time, how many trials ASHA stopped, and the best trial's test HR@10 against the
popularity baseline, as `tuner tune --json` reports them, and from the MLflow store how many
trials ran their step as one CUDA graph (their `step_graph` metric).

    # on a GPU machine: trials share the GPU a quarter each (the embedded default asks for none)
    python benchmarks/quickstart.py --out OUT/quickstart_gpu.json --set resources.gpus_per_worker=0.25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def step_graph_counts(uri: str, experiment: str) -> dict[str, int]:
    """The experiment's trial runs in MLflow, and how many ran their step as one CUDA graph (the
    `step_graph` metric every epoch reports)."""
    import mlflow

    from tuner.tracking import ROLE_TAG

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    trials = [run for run in runs if run.data.tags.get(ROLE_TAG) == "trial"]
    return {"trial_runs": len(trials),
            "trial_runs_with_step_graph": sum(run.data.metrics.get("step_graph") == 1.0 for run in trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to tuner tune")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "tuner", "tune", "--json",
                               *(arg for pair in args.set for arg in ("--set", pair))], cwd=folder,
                              capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"tuner tune failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        graphs = step_graph_counts(summary["tracking_uri"], summary["experiment"])  # an absolute sqlite path
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    result = {"device": f"{device} ({os.cpu_count()} cores)", "command": "python benchmarks/quickstart.py "
              + " ".join(sys.argv[1:]), "wall_s": wall,
              **{k: summary.get(k) for k in ("num_trials", "trials_stopped_early", "trials_completed",
                                             "test_hr_10", "test_ndcg_10", "popularity_hr_10")}, **graphs}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
