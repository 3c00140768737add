"""SecAgg+ whose stage timeouts follow the time the sites actually take.

Flower's ``SecAggPlusWorkflow`` bounds each of its four stages with one fixed ``timeout``,
counted from when the server sends the stage: polling, the start of a ClientApp process and,
in the "collect masked vectors" stage, the sites' whole local training fall inside it. A
fixed 60 s was shorter than three sites training at once on two cores (28-51 s each, plus
polling), so the server gave up on every round while every site had trained and spent its
epsilon. Here each stage waits:

* the stated ``limit_s`` until that stage has been measured once (the first round);
* afterwards ``factor`` times the slowest complete run of that stage so far, never less than
  ``floor_s`` and never more than ``limit_s``.

A stage in which a site dropped out is not used as a measurement (its time is a wait on the
missing site, not the sites' pace). A dead site does not hold a stage for the whole timeout:
the SuperLink fails its messages once it misses its heartbeats (about a minute).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.common import Context
from flwr.common.logger import log
from flwr.server import Grid, LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from server.site_state import SiteStates

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


@dataclass(frozen=True, kw_only=True)
class StagePacing:
    """How long a SecAgg+ stage may wait for the sites, in seconds."""

    floor_s: float
    limit_s: float
    factor: float

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= self.limit_s:
            raise ValueError(
                f"SecAgg+ timeouts need 0 < floor <= limit, got {self.floor_s}, {self.limit_s}"
            )
        if not self.factor >= 1:
            raise ValueError(f"the SecAgg+ timeout factor must be >= 1, got {self.factor}")

    def timeout(self, measured: list[float]) -> float:
        """The timeout for a stage whose complete runs took ``measured`` seconds."""
        if not measured:
            return self.limit_s
        return min(self.limit_s, max(self.floor_s, self.factor * max(measured)))


@dataclass
class StageRun:
    stage: str
    timeout_s: float
    seconds: float
    sites_in: int
    sites_out: int
    completed: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "timeout_s": round(self.timeout_s, 1),
            "seconds": round(self.seconds, 1),
            "sites_in": self.sites_in,
            "sites_out": self.sites_out,
            "completed": self.completed,
        }


class PacedSecAggPlusWorkflow(SecAggPlusWorkflow):  # type: ignore[misc]
    """Flower's SecAgg+ protocol unchanged; only each stage's timeout is chosen per round."""

    def __init__(
        self, *, pacing: StagePacing, states: SiteStates | None = None, **secaggplus: Any
    ) -> None:
        super().__init__(timeout=pacing.limit_s, **secaggplus)
        self.pacing = pacing
        self.states = states  # told which stage is under way (sites.json)
        self.measured: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.runs: list[StageRun] = []  # the current round's stages

    def __call__(self, grid: Grid, context: Context) -> None:
        self.runs = []
        super().__call__(grid, context)

    def round_timing(self) -> list[dict[str, Any]]:
        """The stages of the round in progress (or the last one): timeout, time, sites."""
        return [run.as_json() for run in self.runs]

    def _paced(
        self,
        stage: str,
        run_stage: Callable[[Grid, LegacyContext, WorkflowState], bool],
        grid: Grid,
        context: LegacyContext,
        state: WorkflowState,
    ) -> bool:
        self.timeout = self.pacing.timeout(self.measured[stage])
        if self.states is not None:
            self.states.stage = stage
        sites_in = len(state.active_node_ids)
        started = time.monotonic()
        completed = bool(run_stage(grid, context, state))
        seconds = time.monotonic() - started
        if stage == "setup":  # the sites sampled for the round are known only inside it
            sites_in = len(state.nid_to_fitins)
        sites_out = len(state.active_node_ids)
        if completed and sites_in and sites_out == sites_in:
            self.measured[stage].append(seconds)
        self.runs.append(StageRun(stage, self.timeout, seconds, sites_in, sites_out, completed))
        log(
            INFO,
            "busfed: SecAgg+ %s: %d of %d sites in %.1f s (timeout %.0f s)",
            stage, sites_out, sites_in, seconds, self.timeout,
        )  # fmt: skip
        return completed

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._paced("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._paced("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        return self._paced(
            "collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state
        )

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._paced("unmask", super().unmask_stage, grid, context, state)
