"""Test-run wiring: which tests share an xdist worker (``make test`` runs two workers).

Tests that start Flower processes, console scripts or a SuperLink run one after another in
one group, as they would on a site's machine: two federations at once would each see the
other's load on top of their own and only test the scheduler. Everything else spreads over
both workers.
"""

from __future__ import annotations

import pytest

PROCESS_TESTS = (
    "test_busy_e2e.py",
    "test_deploy_kit.py",
    "test_faults_e2e.py",
    "test_federation_cli.py",
    "test_federation_e2e.py",
    "test_flower_compat.py",
    "test_resume_e2e.py",
    "test_secagg_pacing.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in PROCESS_TESTS or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.xdist_group("processes"))
