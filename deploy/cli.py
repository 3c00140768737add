"""The ``busfed`` command: one entry point for sites, the consortium lead and auditors."""

from __future__ import annotations

import re
import signal
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import click
import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.cli import site_app
from common.errors import EXIT_CODES, BusfedError
from deploy.audit.cli import audit_app
from deploy.demo_settings import DemoSettings
from deploy.federation.cli import federation_app
from deploy.metrics_cli import METRICS_HELP, metrics_command
from deploy.predict_cli import evaluate_command, predict_command
from deploy.pretrain_cli import PRETRAIN_HELP, pretrain_command

console = Console()
err_console = Console(stderr=True)

# Help is click's plain text, wrapped to the terminal: Typer's Rich panels cut option names
# and help at 80 columns ("--score-thresho…"). rich_markup_mode=None alone is not enough in
# Typer 0.20: while Rich is importable it still escapes "[required]" as "\[required]" (fixed
# in 0.21, which flwr 1.41's typer<0.21 pin rules out), hence its flag, read at help time.
typer.core.HAS_RICH = False

app = typer.Typer(
    help="busfed: federated, differentially private breast-ultrasound video risk model.\n\n"
    "Exit codes:\n" + "\n".join(f"{k}  {v}" for k, v in EXIT_CODES.items()),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(site_app, name="site")
app.add_typer(federation_app, name="federation")
app.command(name="metrics", help=METRICS_HELP)(metrics_command)
app.add_typer(audit_app, name="audit")
app.command(name="predict")(predict_command)
app.command(name="evaluate")(evaluate_command)
app.command(name="pretrain", help=PRETRAIN_HELP)(pretrain_command)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="folder to write the site dataset into")],
    site: Annotated[str, typer.Option(help="site name, prefixes patient ids")],
    patients: Annotated[int, typer.Option(min=1)] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    vendor: Annotated[
        str, typer.Option(help="scanner preset: vendor-a, vendor-b, vendor-c")
    ] = "vendor-a",
    frames: Annotated[int, typer.Option(min=8, help="frames per sweep")] = 32,
    size: Annotated[int, typer.Option(min=32, help="frame side in pixels (even)")] = 128,
    normal_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="share of patients with no lesion")
    ] = 0.15,
    min_per_class: Annotated[
        int,
        typer.Option(
            min=0, help="at least this many malignant and benign patients (and both in val)"
        ),
    ] = 0,
) -> None:
    """Write a synthetic hospital: MP4 sweeps, manifest.csv and per-frame lesion boxes."""
    from deploy.synth import generate_site

    with Progress(
        TextColumn("[bold]synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("videos", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        summary = generate_site(
            out, site=site, patients=patients, seed=seed, vendor=vendor, frames=frames,
            size=size, normal_fraction=normal_fraction, progress=tick,
            min_per_class=min_per_class,
        )  # fmt: skip
    console.print(
        f"{summary.site}: {summary.n_patients} patients, {summary.n_videos} videos "
        f"({summary.n_malignant} malignant), vendor {summary.vendor} -> {out}"
    )


@app.command(name="synth-sheet")
def synth_sheet(
    out: Annotated[Path, typer.Option(help="PNG file to write")],
    seed: Annotated[int, typer.Option(min=0, help="seeds every sweep")] = 0,
    size: Annotated[int, typer.Option(min=32, help="frame side in pixels (even)")] = 256,
) -> None:
    """Write a contact sheet of synthetic frames, one row per vendor, to eyeball them."""
    from deploy.synth.sheet import write_contact_sheet

    write_contact_sheet(out, seed=seed, size=size)
    console.print(f"contact sheet -> {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for everything the demo writes")] = Path(
        "out/demo"
    ),
    rounds: Annotated[int, typer.Option(min=1)] = 3,
    sites: Annotated[int, typer.Option(min=3, max=5, help="number of hospitals")] = 3,
    patients: Annotated[int, typer.Option(min=4, help="patients per hospital")] = 16,
    replace: Annotated[bool, typer.Option(help="delete a previous demo in --out first")] = False,
    model: Annotated[
        str,
        typer.Option(
            help="wauve (detector + video classifier), keyframe2d (comparator) or detector "
            "(WAUVE's detector alone)"
        ),
    ] = "wauve",
    data_from: Annotated[
        Path | None,
        typer.Option(
            help="a folder of 3-5 ingested site datasets (busfed site ingest) to federate "
            "instead of synthetic hospitals; read in place; --sites and --patients are ignored"
        ),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            help="start from this model version (a folder or models:/NAME/VERSION), e.g. "
            "busfed pretrain's version 0; default: a version 0 pretrained here on "
            "--pretrain-patients synthetic public patients"
        ),
    ] = "",
    pretrain_patients: Annotated[
        int,
        typer.Option(
            min=0,
            help="synthetic public patients the demo's version 0 is pretrained on (no "
            "privacy budget spent); 0: start from seeded random weights",
        ),
    ] = DemoSettings.pretrain_patients,
    held_out_patients: Annotated[
        int,
        typer.Option(
            min=0,
            help="patients of a synthetic hospital that never trains, scored with the start "
            "and every round's version (AUC with 95% CI); 0: none",
        ),
    ] = DemoSettings.held_out_patients,
    timeout: Annotated[
        float,
        typer.Option(
            min=1,
            help="seconds the federated run may take; then the demo stops it and every "
            "process it started, and exits 5",
        ),
    ] = DemoSettings.timeout_s,
) -> None:
    """Synthetic (or ingested real) hospitals train a model together: TLS, SecAgg+, DP, MLflow."""
    from common.models.bundle import bundle_class
    from deploy.demo import real_sites, run_demo

    if data_from is not None:
        sites = len(real_sites(data_from))
    settings = DemoSettings(
        rounds=rounds, sites=sites, patients=patients, model=bundle_class(model).kind,
        data_from=data_from, init=_absolute_model(init), pretrain_patients=pretrain_patients,
        held_out_patients=held_out_patients, timeout_s=timeout,
    )  # fmt: skip
    run_demo(out, settings, console, replace=replace)


def _absolute_model(model: str) -> str:
    """A model folder as an absolute path (the ServerApp runs elsewhere); a URI as given."""
    if not model or ":/" in model:
        return model
    return str(Path(model).resolve())


HELP_WIDTH = 76  # click indents help text by 2 and wraps it at 78 columns at most
_ITEM = re.compile(r"\d+  |- ")  # an exit code ("3  unreadable input") or a bullet


def _keep_lists(text: str) -> str:
    """``text`` with its lists (exit codes, bullets) kept one item a line for click.

    Click rewraps each paragraph into one; a paragraph of items after an optional heading
    ending in ":" is wrapped here, each item with a hanging indent, and marked with click's
    no-rewrap escape (``\\b``).
    """
    paragraphs = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        items = lines[1:] if lines[0].endswith(":") else lines
        if len(lines) > 1 and all(_ITEM.match(item) for item in items):
            kept = [
                textwrap.fill(item, HELP_WIDTH, subsequent_indent=" " * m.end())
                for item in items
                if (m := _ITEM.match(item))
            ]
            paragraph = "\b\n" + "\n".join(lines[: len(lines) - len(items)] + kept)
        paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def command() -> click.Command:
    """The ``busfed`` click command, every help text's lists kept as lists."""
    root = typer.main.get_command(app)
    todo = [root]
    while todo:
        each = todo.pop()
        if each.help:
            each.help = _keep_lists(each.help)
        todo.extend(getattr(each, "commands", {}).values())
    return root


INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every `with LocalFederation(...)` and stops it


def main() -> None:
    """Console entry point: BusfedError becomes its documented exit code, not a traceback."""
    # A service manager's SIGTERM cleans up like Ctrl-C: no Flower process is left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # Not click's standalone mode, so that errors map to busfed's exit codes here.
        result = command().main(standalone_mode=False)
    except BusfedError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("interrupted; every process started was stopped")
        sys.exit(INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    if result == INTERRUPTED:  # typer turns Ctrl-C into this exit code
        err_console.print("interrupted; every process started was stopped")
    sys.exit(result if isinstance(result, int) else 0)
