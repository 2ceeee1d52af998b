"""Run one `tuner` command inside a chosen container, to find what makes a Ray Train worker slower.

Issue 5's Ray overhead: a host-bound step (plain compile, no CUDA graphs) trains slower in a
one-worker `TorchTrainer` than in a bare process (`benchmarks/epoch_cycle.py --suite
ray_overhead`). A Train worker differs from a bare process in several ways at once: it is a Ray
worker process (Ray's core worker threads, `OMP_NUM_THREADS` from its CPUs), the loop runs on a
`TrainingThread` while the actor's main thread answers the controller's polls, and Train sets up
a `torch.distributed` process group. Each container here adds one of them:

- `thread`: a bare process whose loop runs on a second thread while the main thread waits;
- `ray_task`: a Ray task (one GPU where the node has one, one CPU, nice 0 as Train workers get
  since session 19) whose main thread runs the loop: a Ray worker process, no Train;
- `ray_task_thread`: the same task running the loop on a second thread, as Train does.

    python benchmarks/run_in.py thread -- train --size tiny --max-epochs 2

epoch_cycle.py's `runner` key puts a variant in a container.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

CONTAINERS = ("thread", "ray_task", "ray_task_thread")


def run_tuner(argv: list[str], on_thread: bool) -> int:
    """`tuner` with `argv`, on this thread or a second one; its exit code."""
    from tuner.cli import main

    if not on_thread:
        return main(argv)
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(main(argv)), name="TrainingThread")
    worker.start()
    worker.join()
    return codes[0] if codes else 1


def in_ray_task(argv: list[str], on_thread: bool) -> int:
    import ray

    from tuner.train.driver import NICENESS_ENV, WORKER_NICENESS  # what Train workers are given

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {NICENESS_ENV: WORKER_NICENESS}})
    try:
        gpus = 1 if ray.cluster_resources().get("GPU") else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus)(run_tuner)
        return ray.get(task.remote(argv, on_thread))
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("container", choices=CONTAINERS)
    parser.add_argument("tuner_args", nargs=argparse.REMAINDER, help="-- then the `tuner` command line")
    args = parser.parse_args()
    argv = args.tuner_args[1:] if args.tuner_args[:1] == ["--"] else args.tuner_args
    if not argv:
        parser.error("give the tuner command after --")
    if args.container == "thread":
        return run_tuner(argv, on_thread=True)
    return in_ray_task(argv, on_thread=args.container == "ray_task_thread")


if __name__ == "__main__":
    sys.exit(main())
