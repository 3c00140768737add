"""Timing shared by the benchmark scripts (imported as ``timing``: they run as scripts)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    # On a shared machine the fastest run is the one least disturbed by other work.
    "best": min,
}


def time_in_turn(
    steps: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Wall times of each step over ``repeats``, and each warm-up's result.

    Steps are timed in turn within every repeat, so a load that comes and goes on a shared
    machine slows all of them alike and the ratios stay meaningful.
    """
    results = {name: step() for name, step in steps.items()}  # warm-up: lazy inits, autotuning
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, results
