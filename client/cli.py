"""``busfed site ...``: the commands a hospital site runs.

``site_app`` is a Typer group; the top-level ``busfed`` command mounts it as ``site``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from common.cli import exit_codes
from common.config import SiteConfig, load_site_config, render_site_config
from common.errors import BusfedError, UsageError, ValidationFailed, validation_problems
from common.keys import create_node_keys, create_signing_key, signing_key_paths
from common.privacy.accountant import AccountantKind, SiteAccountant
from common.privacy.advice import BATCH_PATIENTS, Suggestion, check_campaign, suggest_privacy
from common.privacy.settings import DPSettings

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
    from common.data.manifest import load_site  # loads torch: not for --help

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


# The campaign a suggestion is sized to, unless the options say otherwise: `busfed demo`'s
# rounds (deploy.demo.DemoSettings.rounds; a test keeps them equal) and the consortium's
# epsilon ceiling with two stricter budgets.
CAMPAIGN_ROUNDS = 3
CAMPAIGN_EPSILONS = (1.0, 3.0, 8.0)
CAMPAIGN_MODEL = "wauve"

PatientsOption = Annotated[
    int | None,
    typer.Option("--patients", help="Training patients; default: counted in the site's manifest."),
]
CampaignEpsilonOption = Annotated[
    float | None,
    typer.Option(
        "--campaign-epsilon",
        help="The campaign's whole epsilon; default: suggestions for 1, 3 and 8.",
    ),
]
CampaignRoundsOption = Annotated[
    int, typer.Option("--campaign-rounds", help="Federated rounds of the campaign.")
]
StepsPerRoundOption = Annotated[
    int | None,
    typer.Option(
        "--steps-per-round",
        help="DP steps per network per round; default: the site's max local steps.",
    ),
]
CampaignModelOption = Annotated[
    str,
    typer.Option(
        "--campaign-model",
        help="wauve (detector and classifier: 2 networks a round) | keyframe2d | detector",
    ),
]
BatchPatientsOption = Annotated[
    int, typer.Option("--batch-patients", help="Expected patients per DP step (q = this / N).")
]


INIT_HELP = (
    "Set up a site in DIR: write DIR/site.toml, the SuperNode authentication key pair and the "
    "privacy-ledger signing key pair (DIR/keys/).\n\n"
    "The site states every privacy value; none has a default. The noise multiplier, clip norm "
    "and sample rate apply to both models (detector and classifier), and with --keyframe to "
    "the 2D key-frame comparator too (a site of still key frames trains only that one); edit "
    "site.toml to set them per model. Nothing is overwritten: if site.toml or a key exists, "
    "nothing is written.\n\n"
    "It also prints a privacy suggestion (q, sigma) sized to the site's training patients "
    "(counted in DIR's --data manifest, or --patients) for the campaign the --campaign-* "
    "options describe; the site decides, and the suggestion is never written.\n\n"
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
    patients: PatientsOption = None,
    campaign_epsilon: CampaignEpsilonOption = None,
    campaign_rounds: CampaignRoundsOption = CAMPAIGN_ROUNDS,
    steps_per_round: StepsPerRoundOption = None,
    campaign_model: CampaignModelOption = CAMPAIGN_MODEL,
    batch_patients: BatchPatientsOption = BATCH_PATIENTS,
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
        # Before anything is written: a bad --campaign-* option leaves no half-made site.
        advice = _advise(
            config, patients=patients, epsilon=campaign_epsilon, rounds=campaign_rounds,
            steps_per_round=steps_per_round, model=campaign_model, batch_patients=batch_patients,
        )  # fmt: skip
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
    console.print()
    _print_advice(console, advice)


SUGGEST_HELP = (
    "Print a privacy suggestion for an existing site: the patient sampling rate q and the "
    "smallest noise multiplier sigma that keep a campaign (--campaign-rounds rounds of "
    "--steps-per-round DP steps of each network of --campaign-model) within "
    "--campaign-epsilon at the site's delta, computed with the site's accountant from its "
    "training patients (counted in the manifest of the config's data folder, or "
    "--patients); and the epsilon the config's own values would spend.\n\n"
    "q = min(1, --batch-patients / patients): larger batches divide the noise by more "
    "patients. The site decides: nothing is written.\n\n"
    "Exit codes:\n"
    "0  suggestion printed, or no patient count to size it to (said why)\n"
    "2  bad usage: an invalid option, or the site config is missing or invalid"
)


@site_app.command("suggest-privacy", help=SUGGEST_HELP)
def suggest_privacy_command(
    config_path: Annotated[Path, typer.Option("--config", help="The site's site.toml.")],
    patients: PatientsOption = None,
    campaign_epsilon: CampaignEpsilonOption = None,
    campaign_rounds: CampaignRoundsOption = CAMPAIGN_ROUNDS,
    steps_per_round: StepsPerRoundOption = None,
    campaign_model: CampaignModelOption = CAMPAIGN_MODEL,
    batch_patients: BatchPatientsOption = BATCH_PATIENTS,
) -> None:
    with exit_codes():
        config = load_site_config(config_path)
        advice = _advise(
            config, patients=patients, epsilon=campaign_epsilon, rounds=campaign_rounds,
            steps_per_round=steps_per_round, model=campaign_model, batch_patients=batch_patients,
        )  # fmt: skip
    _print_advice(Console(highlight=False), advice)


@dataclass(frozen=True)
class _Advice:
    """What ``_print_advice`` shows: suggestions, or why there are none."""

    config: SiteConfig
    model: str
    suggestions: list[Suggestion]
    counted_in: str  # where the patient count came from
    chosen_epsilon: float | None  # what the config's own sigma and q spend on the campaign
    clip: str  # the config's C for the campaign's networks
    missing: str | None = None


def _advise(
    config: SiteConfig,
    *,
    patients: int | None,
    epsilon: float | None,
    rounds: int,
    steps_per_round: int | None,
    model: str,
    batch_patients: int,
) -> _Advice:
    """Suggestions for the site of ``config`` (see ``common.privacy.advice``).

    Raises
    ------
    UsageError
        An option out of range, named.
    """
    from common.models.bundle import bundle_class  # torch: only for the commands that ask

    try:
        networks = bundle_class(model).network_names
    except UsageError as error:
        raise UsageError(f"--campaign-model: {error}") from None
    privacy = config.privacy
    steps = config.training.max_local_steps if steps_per_round is None else steps_per_round
    counted_in, missing = "--patients", None
    if patients is None:
        patients, counted_in, missing = _training_patients(config.site.data)
    targets = CAMPAIGN_EPSILONS if epsilon is None else (epsilon,)
    suggestions = []
    for target in targets:
        campaign: dict[str, Any] = {
            "epsilon": target, "delta": privacy.delta, "rounds": rounds,
            "steps_per_round": steps, "networks": len(networks), "batch_patients": batch_patients,
        }  # fmt: skip
        if patients is None:  # nothing to size, but the options are still checked
            check_campaign(patients=1, **campaign)
            continue
        suggestions.append(
            suggest_privacy(patients=patients, **campaign, accountant=privacy.accountant)
        )
    chosen = [privacy.of(name) for name in networks if getattr(privacy, name) is not None]
    spent = None
    if suggestions and len(chosen) == len(networks):
        steps_total = rounds * steps
        spent = _spent(privacy.accountant, privacy.delta, chosen, steps_total)
    clip = "/".join(sorted({f"{dp.max_grad_norm:g}" for dp in chosen})) or "-"
    return _Advice(config, model, suggestions, counted_in, spent, clip, missing)


def _spent(kind: AccountantKind, delta: float, chosen: list[DPSettings], steps: int) -> float:
    """The campaign's epsilon with the site's own sigma and q for each network."""
    mechanisms = [(dp.noise_multiplier, dp.sample_rate, steps) for dp in chosen]
    return SiteAccountant(kind).epsilon_if(delta, mechanisms)


def _training_patients(data: Path) -> tuple[int | None, str, str | None]:
    """The training patients in ``data``'s manifest, where from, or why there is no count."""
    from common.data.manifest import MANIFEST, load_site

    manifest = data / MANIFEST
    if not manifest.is_file():
        return None, "", f"{manifest} does not exist yet"
    try:
        site = load_site(data, check_videos=False)  # counting needs no decoding
    except BusfedError as error:
        return None, "", str(error)
    count = len(site.patients("train"))
    if count == 0:
        return None, "", f"{manifest} has no training patient"
    return count, f"counted in the site's {MANIFEST}", None


def _print_advice(console: Console, advice: _Advice) -> None:
    """The suggestion table, labelled as one, in 80 columns."""
    privacy = advice.config.privacy
    title = "[bold]Privacy suggestion[/bold] (the site decides; these values are not written)"
    console.print(title)
    if not advice.suggestions:
        console.print(
            f"no suggestion: {advice.missing}; pass --patients N (training patients), or run "
            "`busfed site suggest-privacy --config site.toml` once the data is ingested.",
            soft_wrap=True,
        )
        return
    first = advice.suggestions[0]
    console.print(
        f"{first.patients} training patients ({advice.counted_in}); campaign: "
        f"{first.rounds} rounds x {first.steps_per_round} steps x {first.networks} "
        f"network{'s' * (first.networks > 1)} ({advice.model}) = {first.steps} DP steps; "
        f"{privacy.accountant} accountant"
    )
    table = Table("target ε", "q", "sigma", "C", "steps", "ε reached", "delta", "noise/C")
    for s in advice.suggestions:
        table.add_row(
            f"{s.epsilon:g}", f"{s.sample_rate:.3g}", f"{s.noise_multiplier:.3g}", advice.clip,
            str(s.steps), f"{s.epsilon_reached:.3f}", f"{s.delta:.2g}",
            f"{s.noise_per_mean:.3f}",
        )  # fmt: skip
    console.print(table)
    for s in advice.suggestions:
        console.print(f"ε {s.epsilon:g}: {s.verdict}", soft_wrap=False)
    console.print(
        "noise/C: noise std on the averaged gradient over C, sigma / (q x patients). C "
        "does not change epsilon; it is the site's own value.",
        soft_wrap=False,
    )
    if advice.chosen_epsilon is not None:
        console.print(
            f"Your site.toml values would spend ε {advice.chosen_epsilon:.3f} at delta "
            f"{privacy.delta:g} on this campaign (budget {privacy.epsilon_budget:g})"
            + (
                ": over the budget, so the site would refuse the rounds past it."
                if advice.chosen_epsilon > privacy.epsilon_budget
                else "."
            ),
            soft_wrap=False,
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
    "CSV. DICOM ultrasound files (single images and cine loops, any name with the DICM "
    "preamble, or .dcm) are read in either case.\n\n"
    "Annotation CSV columns: file, patient_id, label (benign | malignant) and the optional "
    "birads, age, lesion_size_mm, vendor, split (blank split: drawn per patient). Box CSV "
    "(--boxes, default boxes.csv beside the annotations): file, frame, x1, y1, x2, y2 in "
    "source pixels.\n\n"
    "Every video is decoded and re-encoded as H.264 without metadata; burned-in text bands "
    "at the top and bottom of the frames are blacked out; patient ids become keyed hashes "
    "(HMAC-SHA256 with --secret-file); output names are hashes. Of a DICOM file only the "
    "pixels are kept, black outside its ultrasound tissue regions (DICOM PS3.15 Annex E, "
    "Clean Pixel Data); a blank patient_id or vendor is taken from its header, and "
    "OUT/dicom-deid.json records what was done. SRC is only read. Re-runs "
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
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            "--allow-burned-in",
            help="Take DICOM files that say BurnedInAnnotation YES and have no ultrasound "
            "region; only the header-band detector then masks their text.",
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
                allow_burned_in=allow_burned_in,
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
    summary.add_row("  from DICOM files (records: dicom-deid.json)", str(report.dicom))
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
