"""Give back the GPUs of stopped trials: remove placement groups whose creating actor died.

Each trial's `TorchTrainer` controller (an actor) reserves its workers' CPUs and GPUs in a
placement group. When ASHA stops a trial, Tune kills the trial and with it the controller, but a
placement group outlives the actor that created it. Ray Train's own cleaner removes it by asking
the dashboard's State API whether the controller still runs; without the dashboard (a minimal Ray
install, or `--include-dashboard=false`) the reservation stays, the freed GPU share is never
reused, and later trials wait on worker start-up timeouts until other trials end (seen on an H200
in benchmarks/ml1m.py's run: an ASHA-stopped trial's slot stayed empty for five minutes).

`reap()` reads the placement-group table from the GCS (no dashboard needed) and removes every
group whose creator was a Ray Train controller (`TrainController`) that has died. Groups created
by a driver (Tune's own, a user's), by other actors, and detached groups are never touched.
`PlacementGroupReaper` runs it from the Tune driver loop.
"""

from __future__ import annotations

import sys
import time

from ray.tune import Callback


CREATOR_CLASS = "TrainController"  # Ray Train V2's controller actor, which owns the worker group's group


def dead_creator_groups(creator_class: str = CREATOR_CLASS) -> list[bytes]:
    """Ids of live placement groups whose creating (non-detached) `creator_class` actor is dead."""
    from ray._private.state import state
    from ray._raylet import ActorID
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    table = gcs_pb2.PlacementGroupTableData
    found = []
    for raw in accessor.get_placement_group_table():
        pg = table.FromString(raw)
        if pg.state == table.REMOVED or pg.is_detached or not pg.creator_actor_dead:
            continue
        if not pg.creator_actor_id or ActorID(pg.creator_actor_id).is_nil():
            continue  # created by a driver
        actor = accessor.get_actor_info(ActorID(pg.creator_actor_id))
        if actor is None or gcs_pb2.ActorTableData.FromString(actor).class_name.split(".")[-1] != creator_class:
            continue  # not ours to judge
        found.append(pg.placement_group_id)
    return found


def reap() -> int:
    """Remove the placement groups of dead actors; returns how many were removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for pg_id in dead_creator_groups():
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(pg_id)))
            removed += 1
        except Exception:  # already removed by Ray Train's own cleaner
            pass
    return removed


class PlacementGroupReaper(Callback):
    """Calls `reap()` when a trial ends and every `every_s` seconds in between."""

    def __init__(self, every_s: float = 5.0):
        self.every_s, self._last, self._broken = every_s, 0.0, False

    def _reap(self) -> None:
        if self._broken:
            return
        self._last = time.monotonic()
        try:
            reap()
        except Exception as exc:  # a private Ray API: never let it stop an experiment
            self._broken = True
            print(f"tuner: warning: cannot clean up stopped trials' placement groups ({exc.__class__.__name__}); "
                  f"relying on Ray Train's cleaner", file=sys.stderr)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._reap()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._reap()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._reap()
