"""Per-round wall time of a real 3-site federation on 127.0.0.1, with and without SecAgg+.

Both runs use the same synthetic hospitals, preset and local steps, one after the other in
this process, so their ratio is what SecAgg+ costs here. Without SecAgg+ the sites' configs
must allow it (the demo's sites refuse to train in the clear). Prints a table; asserts nothing.

    .venv/bin/python benchmarks/round_time.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deploy.demo import DemoSettings, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patients", type=int, default=8)
    args = parser.parse_args()
    console = Console()
    quiet = Console(quiet=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for secure in (True, False):
            settings = DemoSettings(
                rounds=args.rounds, patients=args.patients, frames=16, size=64, local_steps=1,
                secure_aggregation=secure,
            )  # fmt: skip
            console.print(f"running {args.rounds} rounds, secure aggregation {secure} ...")
            summary = run_demo(Path(tmp) / f"secure-{secure}", settings, quiet)
            times = [r["metrics"]["round_seconds"] for r in summary["rounds"]]
            fits = [r["metrics"].get("fit_seconds", float("nan")) for r in summary["rounds"]]
            rows.append((secure, times, fits, summary["wall_seconds"]))
    table = Table(title="round time, 3 sites, tiny preset, 2 CPU cores")
    for col in (
        "SecAgg+",
        "round 1 s",
        "later rounds s (median)",
        "site fit s (mean)",
        "run wall s",
    ):
        table.add_column(col, justify="right")
    for secure, times, fits, wall in rows:
        later = statistics.median(times[1:]) if len(times) > 1 else float("nan")
        table.add_row(
            str(secure),
            f"{times[0]:.1f}",
            f"{later:.1f}",
            f"{statistics.mean(fits):.1f}",
            f"{wall:.0f}",
        )
    console.print(table)
    secure_later = statistics.median(rows[0][1][1:] or rows[0][1])
    plain_later = statistics.median(rows[1][1][1:] or rows[1][1])
    console.print(f"SecAgg+ / plain, per round after the first: {secure_later / plain_later:.2f}x")


if __name__ == "__main__":
    main()
