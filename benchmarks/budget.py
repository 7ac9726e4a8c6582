"""A run's time budget (--budget-s): a case starts only when it is expected to end in time.

Checking only "is the budget spent?" before each case let a case that started a second before the
deadline run to its end, minutes over on a large model or under torch.compile; gpu.sh has a fixed
slot. So each case's duration is estimated from the cases already run, before it is built."""

import time
from typing import Callable, List, Optional, Tuple

from .cases import Case


def work(case: Case) -> float:
    """A rough cost proxy known before the model is built (MACs are not): pixels per step, a
    training step ≈ 3 forwards."""
    return case.batch * case.resolution**2 * (3 if case.mode == "train" else 1)


def estimate_seconds(case: Case, durations: List[Tuple[Case, float]]) -> float:
    """Seconds ``case`` may take (build, warm-up, timed steps, the memory step): the longest case
    so far, scaled up where this one has more work; never scaled down, since the proxy misses
    what makes a case slow without more pixels (a bigger model, autotuning, compilation)."""
    return max((seconds * max(1.0, work(case) / work(done)) for done, seconds in durations), default=0.0)


class Budget:
    """``budget_s`` seconds from construction (None: unlimited); ``record`` each case's duration."""

    def __init__(self, budget_s: Optional[float], clock: Optional[Callable[[], float]] = None):
        self.budget_s = budget_s
        self.clock = clock or time.monotonic
        self.started = self.clock()
        self.durations: List[Tuple[Case, float]] = []

    def refusal(self, case: Case) -> Optional[str]:
        """Why ``case`` must not start (its skipped row's reason), or None. The first case always
        starts: a run that measured nothing would say nothing about the slot either."""
        if self.budget_s is None or not self.durations:
            return None
        elapsed = self.clock() - self.started
        estimate = estimate_seconds(case, self.durations)
        if elapsed + estimate <= self.budget_s:
            return None
        return (
            f"time budget of {self.budget_s:g} s: {elapsed:.0f} s spent, this case would "
            f"take ~{estimate:.0f} s more"
        )

    def record(self, case: Case, since: float) -> None:
        """``case`` ran from ``since`` (a reading of ``clock``) until now, errors included."""
        self.durations.append((case, self.clock() - since))
