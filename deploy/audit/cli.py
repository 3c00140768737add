"""``busfed audit ...``: what an auditor runs on the sites' privacy ledgers.

``audit_app`` is a Typer group; the top-level ``busfed`` command mounts it as ``audit``. The
work is in ``deploy.audit.verify``, ``.report`` and ``.empirical``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.errors import BusfedError, ValidationFailed
from common.privacy.empirical import load_empirical
from deploy.audit.empirical_cli import EMPIRICAL_HELP, empirical_command
from deploy.audit.report import load_versions, write_report
from deploy.audit.verify import (
    EPSILON_ABS_TOLERANCE,
    EPSILON_REL_TOLERANCE,
    AuditResult,
    verify_ledgers,
)

audit_app = typer.Typer(help="Commands an auditor runs.", no_args_is_help=True)


@audit_app.callback()
def _audit() -> None:
    """Commands an auditor runs."""


_CHECKS = (
    "Checks every line of each ledger: the Ed25519 signature against the enrolled key "
    "DIR/<site>.ledger.pub, the SHA-256 hash chain, that rounds never decrease within a run "
    "and no (round, model) repeats, that each trained entry stays inside its budget, and "
    "recomputes epsilon_round and epsilon_total from the recorded parameters with Google's "
    "dp-accounting (RDP or PLD, as the entry's accountant says), independently of the site's "
    f"Opacus accountant; a difference over {EPSILON_REL_TOLERANCE:.0%} (+ "
    f"{EPSILON_ABS_TOLERANCE:g}) fails. The first bad entry of each file is named with its "
    "file and line.\n\n"
)
_CODES = "2  bad usage: a ledger file or the keys folder is missing, or a bad option"

VERIFY_HELP = (
    "Verify sites' privacy ledgers.\n\n" + _CHECKS + "Exit codes:\n"
    "0  every ledger verified\n"
    "1  a ledger failed verification (its first bad entry is named)\n" + _CODES
)

REPORT_HELP = (
    "Verify sites' privacy ledgers and write a static, self-contained HTML report.\n\n"
    + _CHECKS
    + "The report shows the verdict, each site's epsilon over rounds against its budget "
    "(also written as PNG files beside the HTML), the refusals and every entry's "
    "parameters. --empirical adds the result of `busfed audit empirical`: its lower bound on "
    "epsilon next to the claimed one and the ledgers' epsilons.\n\n"
    "Exit codes:\n"
    "0  report written, every ledger verified (and the empirical bound, if given, is at "
    "most its claimed epsilon)\n"
    "1  report written, a ledger failed verification or the empirical bound exceeds its "
    "claimed epsilon\n" + _CODES
)

Ledgers = Annotated[
    list[Path], typer.Argument(metavar="LEDGER...", help="Site ledger files (JSON lines).")
]
Keys = Annotated[
    Path,
    typer.Option(
        "--keys", metavar="DIR", help="Folder of enrolled ledger public keys <site>.ledger.pub."
    ),
]


def _fail(error: BusfedError, *, as_json: bool = False) -> typer.Exit:
    if as_json:
        typer.echo(json.dumps({"error": str(error), "exit_code": error.exit_code}))
    else:
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(code=error.exit_code)


def _print(result: AuditResult) -> None:
    console = Console(highlight=False)
    table = Table("ledger", "site", "verified", "epsilon_total", "budget", "verdict")
    for ledger in result.ledgers:
        last = ledger.entries[-1].entry if ledger.entries else None
        table.add_row(
            str(ledger.file),
            ledger.site or "?",
            f"{len(ledger.entries)}/{ledger.lines}",
            "" if last is None else f"{last.epsilon_total:.4f} at delta {last.delta:g}",
            "" if last is None else f"{last.budget:g}",
            "[green]ok[/green]" if ledger.ok else "[red]FAILED[/red]",
        )
    console.print(table)
    for ledger in result.ledgers:
        if ledger.problem is not None:
            console.print(f"[red]{ledger.problem}[/red]", soft_wrap=True)
    console.print("verified" if result.ok else "[red]verification failed[/red]")


@audit_app.command(help=VERIFY_HELP)
def verify(
    ledgers: Ledgers,
    keys: Keys,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a table.")
    ] = False,
) -> None:
    try:
        result = verify_ledgers(ledgers, keys)
    except BusfedError as error:
        raise _fail(error, as_json=as_json) from error
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print(result)
    if not result.ok:
        raise typer.Exit(code=ValidationFailed.exit_code)


@audit_app.command(help=REPORT_HELP)
def report(
    ledgers: Ledgers,
    keys: Keys,
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")],
    versions: Annotated[
        Path | None,
        typer.Option(
            "--versions",
            help='JSON {"<round>": "<registered model version>"}; adds a model version column.',
        ),
    ] = None,
    empirical: Annotated[
        Path | None,
        typer.Option(
            "--empirical",
            metavar="JSON",
            help="empirical.json from `busfed audit empirical`; adds its section.",
        ),
    ] = None,
) -> None:
    try:
        mapping = None if versions is None else load_versions(versions)
        audit = None if empirical is None else load_empirical(empirical)
        result = verify_ledgers(ledgers, keys)
    except BusfedError as error:
        raise _fail(error) from error
    written = write_report(result, out, versions=mapping, empirical=audit)
    _print(result)
    Console(highlight=False).print(
        f"report: {written[0]}; plots: {', '.join(map(str, written[1:]))}"
    )
    if audit is not None and not audit.consistent:
        Console(highlight=False).print(
            f"[red]the empirical bound {audit.epsilon_lower_bound:.4f} exceeds the claimed "
            f"epsilon {audit.epsilon_claimed:.4f}[/red]"
        )
    if not result.ok or (audit is not None and not audit.consistent):
        raise typer.Exit(code=ValidationFailed.exit_code)


audit_app.command(name="empirical", help=EMPIRICAL_HELP)(empirical_command)
