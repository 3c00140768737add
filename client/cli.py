"""``busfed site ...``: the commands a hospital site runs.

``site_app`` is a Typer group; the top-level ``busfed`` command mounts it as ``site``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.data.manifest import load_site
from common.errors import BusfedError, UsageError, ValidationFailed

site_app = typer.Typer(help="Commands a hospital site runs.", no_args_is_help=True)


@site_app.callback()
def _site() -> None:
    """Commands a hospital site runs."""


VALIDATE_HELP = (
    "Check a site dataset: list every bad row with its file, line, field and reason.\n\n"
    "Every video is opened once to check that it decodes, and boxes are checked against the "
    "video's frame count and size. Training skips bad rows; this command shows them.\n\n"
    "Exit codes:\n"
    "0  no problems\n"
    "1  problems found (each one listed)\n"
    "2  bad usage: DIR is not a folder\n"
    "3  the manifest or boxes file is unreadable: manifest missing, not UTF-8 CSV, or a "
    "required column missing"
)


@site_app.command(help=VALIDATE_HELP)
def validate(
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", help="Site folder with manifest.csv, boxes.csv and the videos."
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a table.")
    ] = False,
) -> None:
    try:
        if not directory.is_dir():
            raise UsageError(f"{directory}: no such folder")
        site = load_site(directory)
    except BusfedError as error:
        if as_json:
            typer.echo(json.dumps({"error": str(error), "exit_code": error.exit_code}))
        else:
            Console(stderr=True).print(
                f"[red]error:[/red] {error}", highlight=False, soft_wrap=True
            )
        raise typer.Exit(code=error.exit_code) from error

    if as_json:
        result = {
            "site": str(directory),
            "rows_ok": len(site.rows),
            "problems": [asdict(problem) for problem in site.problems],
        }
        typer.echo(json.dumps(result, indent=2))
    else:
        console = Console(highlight=False)
        if site.problems:
            table = Table("file", "line", "field", "reason", title=f"Problems in {directory}")
            for problem in site.problems:
                table.add_row(problem.file, str(problem.line), problem.field, problem.reason)
            console.print(table)
        console.print(f"{len(site.rows)} rows ok, {len(site.problems)} problems", soft_wrap=True)
    if site.problems:
        raise typer.Exit(code=ValidationFailed.exit_code)
