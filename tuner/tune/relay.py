"""Train results to Tune, reported from the trial function's own thread.

Ray's `TuneReportCallback` hands each Train result to the trial actor's main thread, which passes
it on through a one-slot queue that the trial function's thread also writes to: when it reports,
and when it returns (Tune's closing result). If `fit()` returns before the main thread has taken
the last Train result (the Tune driver was still busy with the one before, e.g. logging it to
MLflow), both threads write to the full slot, the main thread blocks on its own queue, and the
trial hangs with its resources held. `python tests/relay_check.py ray 4 DIR` reproduces it
with Ray 2.60.

Here the Train controller puts each result into a queue of our own, `fit()` runs in a helper
thread, and the trial function's thread takes the results and reports them itself, so every
report comes from one thread, in order, and the closing result can no longer overtake one.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional

from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY  # TuneReportCallback's key; results keep it


class ReportRelay(UserCallback):
    """A Train callback that queues each rank-0 result (with its checkpoint's path) for the trial
    function. The queue holds one result: the controller waits until the trial function has taken
    the previous one, so Train runs at most one epoch ahead of Tune (and of ASHA), as with Ray's own."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[Any]) -> None:
        result = dict(metrics[0])
        if checkpoint:
            result[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(result)


def fit_relaying(fit: Callable[[], Any], relay: ReportRelay, report: Callable[[dict], None],
                 poll_s: float = 0.2) -> None:
    """Run `fit` (a trainer's fit, with `relay` among its callbacks) in a helper thread and pass
    each queued result to `report` (`ray.tune.report`) from this thread, until fit has returned
    and the queue is empty; then raise fit's error, if any."""
    from ray.util.queue import Empty

    failure: list[BaseException] = []

    def target() -> None:
        try:
            fit()
        except BaseException as exc:  # raised again in the trial function's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="trainer-fit", daemon=True)
    thread.start()
    try:
        while True:
            done = not thread.is_alive()  # read before the get: every put of a finished fit is visible
            try:
                result = relay.queue.get(block=not done, timeout=None if done else poll_s)
            except Empty:
                if done:
                    break
                continue
            report(result)
    finally:
        if not thread.is_alive():
            relay.queue.shutdown()
    if failure:
        raise failure[0]
