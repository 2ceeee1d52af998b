"""A Tune trial that fits a TorchTrainer while the Tune driver is slow with each result; prints
one JSON object: what the driver received.

    python tests/relay_check.py MODE DELAY_S STORAGE [--fail]

MODE `ours` relays Train's results with `tuner.tune.relay`, MODE `ray` with Ray's
`TuneReportCallback`. The trial reports 3 epochs (a checkpoint at epoch 2), then a closing result
from the trial function, as `tuner tune`'s trials do. With DELAY_S of a few seconds, `ray` hangs
on Ray 2.60 (the trial never ends; run it under `timeout`). `--fail` makes epoch 2 raise.
Run by tests/test_relay.py.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def loop(config: dict) -> None:
    from ray import train

    for epoch in (1, 2, 3):
        if epoch == 2 and config["fail"]:
            raise RuntimeError("epoch 2 failed on purpose")
        checkpoint = None
        if epoch == 2:
            folder = tempfile.mkdtemp()
            Path(folder, "state.txt").write_text("2")
            checkpoint = train.Checkpoint.from_directory(folder)
        train.report({"epoch": epoch, "score": float(epoch)}, checkpoint=checkpoint)


def main() -> int:
    import ray
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    mode, delay, storage = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    fail = "--fail" in sys.argv[4:]

    def trial(config: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from tuner.tune.relay import ReportRelay, fit_relaying

        callback = ReportRelay() if mode == "ours" else TuneReportCallback()
        trainer = TorchTrainer(loop, train_loop_config={"fail": fail}, scaling_config=ScalingConfig(num_workers=1),
                               run_config=RunConfig(name=f"t-{tune.get_context().get_trial_id()}",
                                                    storage_path=f"{storage}/train", callbacks=[callback],
                                                    failure_config=FailureConfig(max_failures=0)))
        if mode == "ours":
            fit_relaying(trainer.fit, callback, tune.report)
        else:
            trainer.fit()
        tune.report({"closing": 1})

    seen: list[dict] = []

    class SlowDriver(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append({k: result.get(k) for k in ("epoch", "closing", "checkpoint_path")})
            time.sleep(delay)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    start = time.time()
    try:
        grid = tune.Tuner(trial, tune_config=tune.TuneConfig(num_samples=1),
                          run_config=tune.RunConfig(storage_path=f"{storage}/tune", callbacks=[SlowDriver()])).fit()
        errors = [str(r.error) for r in grid if r.error]
    finally:
        ray.shutdown()
    print(json.dumps({"mode": mode, "results": seen, "errors": errors, "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
