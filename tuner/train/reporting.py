"""Where metrics go: one small interface, several backends.

The loop calls `reporter.log(epoch, metrics, checkpoint)` once per epoch and
`reporter.final(metrics)` once at the end; it never knows whether a console, Ray or MLflow
listens. Backends: `ConsoleReporter` (one line per epoch on stderr), `MultiReporter` (fan-out);
`tuner.train.driver.RayReporter` forwards to `ray.train.report`.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Protocol

from tuner.train.checkpoint import Snapshot

EPOCH_KEYS = ("train_loss", "val_hr_10", "val_ndcg_10", "samples_per_s", "epoch_s", "eval_s", "peak_mem_mb")


class Reporter(Protocol):
    def log(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Snapshot] = None) -> None: ...

    def final(self, metrics: dict[str, float]) -> None: ...


class ConsoleReporter:
    """One line per epoch on stderr, so stdout stays clean for `--json`."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def log(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Snapshot] = None) -> None:
        if not self.enabled:
            return
        parts = [f"epoch {epoch:3d}", f"at {time.perf_counter() - self.t0:.2f}s"]  # seconds since start
        parts += [f"{k} {metrics[k]:.4g}" for k in EPOCH_KEYS if k in metrics]
        print("  ".join(parts), file=self.stream, flush=True)

    def final(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        keys = ("test_hr_10", "test_ndcg_10", "popularity_hr_10", "popularity_ndcg_10", "best_epoch")
        print("final    " + "  ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics),
              file=self.stream, flush=True)


class MultiReporter:
    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def log(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Snapshot] = None) -> None:
        for reporter in self.reporters:
            reporter.log(epoch, metrics, checkpoint)

    def final(self, metrics: dict[str, float]) -> None:
        for reporter in self.reporters:
            reporter.final(metrics)
