"""``busfed site ...``: the commands a hospital site runs.

``site_app`` is a Typer group; the top-level ``busfed`` command mounts it as ``site``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from common.cli import exit_codes
from common.config import SiteConfig, render_site_config
from common.data.manifest import load_site
from common.errors import BusfedError, UsageError, ValidationFailed, validation_problems
from common.keys import create_node_keys, create_signing_key, signing_key_paths

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


INIT_HELP = (
    "Set up a site in DIR: write DIR/site.toml, the SuperNode authentication key pair and the "
    "privacy-ledger signing key pair (DIR/keys/).\n\n"
    "The site states every privacy value; none has a default. The noise multiplier, clip norm "
    "and sample rate apply to both models (detector and classifier), and with --keyframe to "
    "the 2D key-frame comparator too (a site of still key frames trains only that one); edit "
    "site.toml to set them per model. Nothing is overwritten: if site.toml or a key exists, "
    "nothing is written.\n\n"
    "Exit codes:\n"
    "0  site written\n"
    "2  bad usage: a missing or invalid option, or a file that would be overwritten"
)


@site_app.command(help=INIT_HELP)
def init(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Site folder (created if missing).")
    ],
    name: Annotated[str, typer.Option(help="Site name: letters, digits, '.', '_', '-'.")],
    data: Annotated[
        Path, typer.Option(help="Site dataset folder (manifest.csv, boxes.csv, videos).")
    ],
    epsilon_budget: Annotated[
        float, typer.Option(help="Total epsilon at DELTA the site allows over every round.")
    ],
    delta: Annotated[float, typer.Option(help="The delta of (epsilon, delta)-DP, per patient.")],
    noise_multiplier: Annotated[
        float, typer.Option(help="sigma: Gaussian noise std over the clip norm.")
    ],
    max_grad_norm: Annotated[
        float, typer.Option(help="C: each patient's whole gradient is clipped to this norm.")
    ],
    sample_rate: Annotated[
        float, typer.Option(help="q: Poisson sampling rate of patients per DP-SGD step.")
    ],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads for training.")] = 1,
    accountant: Annotated[str, typer.Option(help="rdp | prv")] = "rdp",
    frame_stride: Annotated[int, typer.Option(help="Detector trains on every n-th frame.")] = 2,
    max_frames_per_video: Annotated[int, typer.Option()] = 16,
    max_local_steps: Annotated[
        int, typer.Option(help="The most DP steps per model per round.")
    ] = 3,
    keyframe: Annotated[
        bool,
        typer.Option(
            "--keyframe",
            help="Also let the site train the keyframe2d comparator ([privacy.keyframe], the "
            "same values).",
        ),
    ] = False,
) -> None:
    with exit_codes():
        model = {
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": max_grad_norm,
            "sample_rate": sample_rate,
        }
        config = _site_config(
            {
                "site": {
                    "name": name,
                    "data": data.expanduser().resolve(),
                    "state": Path("state"),
                    "device": device,
                    "threads": threads,
                },
                "privacy": {
                    "privacy_unit": "patient",
                    "epsilon_budget": epsilon_budget,
                    "delta": delta,
                    "accountant": accountant,
                    "require_secure_aggregation": True,
                    "secure_rng": True,
                    "detector": model,
                    "classifier": model,
                    **({"keyframe": model} if keyframe else {}),
                },
                "training": {
                    "frame_stride": frame_stride,
                    "max_frames_per_video": max_frames_per_video,
                    "max_local_steps": max_local_steps,
                },
            }
        )
        text = render_site_config(config)
        if SiteConfig.model_validate(tomllib.loads(text)) != config:
            raise UsageError(f"--data {data}: this path cannot be written to TOML as it is")
        keys = directory / "keys"
        node_private, node_public = keys / f"{name}.key", keys / f"{name}.pub"
        ledger_private, ledger_public = signing_key_paths(keys, site=name)
        config_path = directory / "site.toml"
        existing = [
            path
            for path in (config_path, node_private, node_public, ledger_private, ledger_public)
            if path.exists()
        ]
        if existing:
            raise UsageError(
                "refusing to overwrite: " + ", ".join(map(str, existing)) + " (a replaced key "
                "orphans the site's enrolment and every ledger entry it signed)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        create_node_keys(keys, site=name)
        create_signing_key(keys, site=name)
        with config_path.open("x") as f:
            f.write(text)

    console = Console(highlight=False)
    console.print(f"Site [bold]{name}[/bold] set up: {config_path}", soft_wrap=True)
    if not (config.site.data / "manifest.csv").exists():
        console.print(
            f"note: {config.site.data} has no manifest.csv yet; run `busfed site validate` on "
            "it once the export is there.",
            soft_wrap=True,
        )
    console.print(
        "\n[bold]Send to the consortium[/bold] (public keys):\n"
        f"  {node_public}  SuperNode key: the consortium enrols it so your SuperNode may "
        "connect\n"
        f"  {ledger_public}  ledger key: the auditor verifies your privacy ledger with it\n"
        "\n[bold]Never send[/bold] (keep them here, readable by the site only, and backed up):\n"
        f"  {node_private}  SuperNode private key\n"
        f"  {ledger_private}  signs your privacy ledger; if lost, new entries cannot be signed "
        "with the enrolled key\n"
        f"  {config.site.data}  the patients' videos and annotations\n"
        f"  {directory / 'state'}  the accountant and the ledger (the server receives copies "
        "of ledger entries, not this folder)",
        soft_wrap=True,
    )


def _site_config(raw: dict[str, Any]) -> SiteConfig:
    """Validate init's options as a ``SiteConfig``; errors name the option, not the field."""
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as exc:
        # detector and classifier share one option: it is said once
        problems = validation_problems(exc, name=lambda loc: f"--{str(loc[-1]).replace('_', '-')}")
        raise UsageError("invalid site settings:\n" + "\n".join(problems)) from exc


INGEST_HELP = (
    "Build the de-identified site dataset OUT from a hospital export SRC: videos (AVI, MP4, "
    "...) with an annotation CSV, or with --key-frames images in label folders (SRC/benign, "
    "SRC/malignant, SRC/normal) or anywhere under SRC with a label in the annotation "
    "CSV.\n\n"
    "Annotation CSV columns: file, patient_id, label (benign | malignant) and the optional "
    "birads, age, lesion_size_mm, vendor, split (blank split: drawn per patient). Box CSV "
    "(--boxes, default boxes.csv beside the annotations): file, frame, x1, y1, x2, y2 in "
    "source pixels.\n\n"
    "Every video is decoded and re-encoded as H.264 without metadata; burned-in text bands "
    "at the top and bottom of the frames are blacked out; patient ids become keyed hashes "
    "(HMAC-SHA256 with --secret-file); output names are hashes. SRC is only read. Re-runs "
    "process only what changed (OUT/.ingest-state.json).\n\n"
    "Exit codes:\n"
    "0  dataset written, no file rejected\n"
    "1  dataset written, some files rejected (each listed with its reason)\n"
    "2  bad usage: SRC missing, OUT not ingest's, a weak or group-readable secret\n"
    "3  the annotation or box CSV, or the ingest state, is unreadable"
)


@site_app.command(help=INGEST_HELP)
def ingest(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="The hospital's export folder.")],
    out: Annotated[Path, typer.Option("--out", help="The site dataset folder to write.")],
    secret_file: Annotated[
        Path,
        typer.Option(
            "--secret-file",
            help="The site's pseudonymisation secret (>= 16 bytes, mode 0600); keep it "
            "with the site's keys and never send it.",
        ),
    ],
    annotations: Annotated[
        Path | None,
        typer.Option("--annotations", help="Annotation CSV (optional with --key-frames)."),
    ] = None,
    boxes: Annotated[
        Path | None,
        typer.Option("--boxes", help="Box CSV; default: boxes.csv beside the annotations."),
    ] = None,
    key_frames: Annotated[
        bool,
        typer.Option(
            "--key-frames",
            help="SRC holds key-frame images (in label folders, or labelled by the "
            "annotations), not videos.",
        ),
    ] = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from client.deid import load_secret
    from client.ingest import ingest as run_ingest

    console = Console(highlight=False)
    with exit_codes():
        secret = load_secret(secret_file)
        with Progress(
            "[bold]ingesting", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        ) as progress:  # fmt: skip
            task = progress.add_task("files", total=None)
            report = run_ingest(
                src,
                out,
                secret=secret,
                annotations=annotations,
                boxes=boxes,
                key_frames=key_frames,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )

    if report.rejected:
        table = Table("file", "reason", title="Rejected files")
        for rejected in report.rejected:
            table.add_row(rejected.file, rejected.reason)
        console.print(table)
    masked = [mask for mask in report.masks if mask.rows]
    summary = Table("", "files", title=f"Ingest into {out}", show_header=False)
    summary.add_row("processed (decoded, de-identified, written)", str(len(report.processed)))
    summary.add_row("unchanged since the last run", str(report.unchanged))
    summary.add_row("rejected", str(len(report.rejected)))
    summary.add_row("outputs removed (source gone or now invalid)", str(report.removed))
    summary.add_row("videos in the manifest", str(report.videos))
    summary.add_row(
        "  with burned-in text blacked out",
        f"{len(masked)} ({sum(m.frames_with_text for m in masked)} frames showed text; "
        f"{max((m.rows for m in masked), default=0)} rows per frame at most)",
    )
    console.print(summary)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    if report.rejected:
        raise typer.Exit(code=ValidationFailed.exit_code)


DOCTOR_HELP = (
    "Check that this site is ready for a federated round: Python and pinned packages, GPU, "
    "free disk at the state folder, the dataset, the keys (mode 0600), the consortium CA "
    "certificate (default: ca.crt in the keys folder), the SuperLink over TLS "
    "(--superlink), enrolment (not checked: ask the lead) and the privacy budget left.\n\n"
    "Each check prints pass, warn, fail or not checked, with the fix.\n\n"
    "Exit codes:\n"
    "0  no check failed (warnings allowed)\n"
    "1  a check failed"
)


@site_app.command(help=DOCTOR_HELP)
def doctor(
    config: Annotated[Path, typer.Option("--config", help="The site's site.toml.")],
    superlink: Annotated[
        str | None,
        typer.Option("--superlink", metavar="HOST:PORT", help="The consortium's SuperLink."),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="Consortium CA certificate; default: <keys>/ca.crt."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a table.")
    ] = False,
) -> None:
    from client.doctor import exit_code, run_checks

    checks = run_checks(config, superlink=superlink, ca=ca)
    code = exit_code(checks)
    if as_json:
        result = {"config": str(config), "ok": code == 0, "checks": [c.to_dict() for c in checks]}
        typer.echo(json.dumps(result, indent=2))
    else:
        colour = {"pass": "green", "warn": "yellow", "fail": "red", "not checked": "dim"}
        table = Table("check", "status", "found", "fix", title=f"busfed site doctor: {config}")
        for check in checks:
            status = f"[{colour[check.status]}]{check.status}[/]"
            table.add_row(check.name, status, check.detail, check.fix)
        Console(highlight=False).print(table)
    if code:
        raise typer.Exit(code=code)
