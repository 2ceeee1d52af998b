"""What Ray Train's controller poll costs a Python-bound training loop (issue 5's Ray overhead).

`tuner` sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S to 0.1 s so that short epochs are not stretched to
the 2 s default (tuner/train/driver.py). A poll is a remote call into the worker process, which
could take the GIL from a host-bound loop. This times the same pure-Python work (median of 7)
in a bare process and inside a one-worker TorchTrainer at each poll interval, and records the
worker's OMP_NUM_THREADS and torch thread count.

    python benchmarks/poll_cost.py --out benchmarks/results/poll_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def work(n: int = 3_000_000) -> float:
    t0, x = time.perf_counter(), 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - t0


def in_worker(config: dict) -> None:
    # a file, not ray.train.report: Train V2 keeps no metrics reported without a checkpoint;
    # with the worker's OMP_NUM_THREADS and torch thread count (Ray sets them from its CPUs: 1 here)
    import torch

    Path(config["result"]).write_text(json.dumps({
        "work_s": statistics.median(work() for _ in range(7)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", nargs="+", default=["0.1", "2.0"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rows = []
    for interval in args.intervals:
        bare = statistics.median(work() for _ in range(7))
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            with tempfile.TemporaryDirectory() as storage:
                result = Path(storage) / "work_s"
                TorchTrainer(in_worker, train_loop_config={"result": str(result)},
                             scaling_config=ScalingConfig(num_workers=1),
                             run_config=RunConfig(name="poll", storage_path=storage)).fit()
                worker = json.loads(result.read_text())
        finally:
            ray.shutdown()
        rows.append({"poll_interval_s": float(interval), "bare_work_s": bare, "worker_work_s": worker["work_s"],
                     "ratio": worker["work_s"] / bare, "worker_omp_num_threads": worker["omp_num_threads"],
                     "worker_torch_threads": worker["torch_threads"]})
        print(json.dumps(rows[-1]), flush=True)
    out = {"device": f"CPU ({os.cpu_count()} cores)",
           "command": "python benchmarks/poll_cost.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
