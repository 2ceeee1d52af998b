"""A `ConcurrencyLimiter` with a wall-clock budget for proposing trials.

Tune's own `time_budget_s` stops every running trial when it expires, so none of them tests its
best weights. Instead, the searcher stops proposing once the proposal budget is spent (Tune then
starts no new trial), and every running trial ends itself at the epoch that would overrun the
experiment's deadline (`train_worker(deadline=...)`), then reports its test metrics as usual.
"""

from __future__ import annotations

import time
from typing import Optional

from ray.tune.search import ConcurrencyLimiter, Searcher


class BudgetedLimiter(ConcurrencyLimiter):
    """Proposes trials for `budget_s` seconds after its first proposal in this process (0 = no
    limit); a restored experiment (`--resume`) starts a fresh budget."""

    def __init__(self, searcher: Searcher, max_concurrent: int, budget_s: float = 0.0):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.budget_s = budget_s
        self._first_suggest: Optional[float] = None

    def suggest(self, trial_id: str):
        now = time.monotonic()
        if self._first_suggest is None:
            self._first_suggest = now
        if self.budget_s and now - self._first_suggest > self.budget_s:
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def get_state(self) -> dict:
        state = super().get_state()
        state.pop("_first_suggest", None)
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._first_suggest = None
