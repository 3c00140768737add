"""``busfed federation ...``: the commands the consortium lead runs.

``federation_app`` is a Typer group; the top-level ``busfed`` command mounts it as
``federation``. The logic is in the other modules of ``deploy.federation``; this module
parses, prints and maps errors to exit codes. It is a little over 500 lines because it is
nine commands' options and help texts, which read best in the order `--help` lists them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.cli import reports_errors
from common.site_states import describe_site_states
from deploy.federation.consortium import (
    DEFAULT_PORT,
    DEFAULT_REGISTERED_MODEL,
    Consortium,
    init_consortium,
)
from deploy.federation.enrolment import enrol_site, revoke_site
from deploy.federation.runs import active_run, start_run, stop_run, wait_for_run
from deploy.federation.status import federation_status
from deploy.federation.superlink import serve_superlink
from deploy.pki import SERVER_LIFETIME, renew_server_certificate

federation_app = typer.Typer(
    help="Commands the consortium lead runs: set up, enrol sites, run the SuperLink, "
    "start and watch training.",
    no_args_is_help=True,
)


DirOption = Annotated[
    Path,
    typer.Option(
        "--dir",
        envvar="BUSFED_CONSORTIUM",
        help="The consortium folder (from `busfed federation init`); or $BUSFED_CONSORTIUM.",
    ),
]

EXIT_USAGE = "2  bad usage: a missing or invalid argument, option or consortium file"
EXIT_FEDERATION = "5  the SuperLink is unreachable, refused the request, or exited"


def _exit_codes(*lines: str) -> str:
    return "\n\nExit codes:\n0  success\n" + "\n".join(lines)


def _console() -> Console:
    return Console(highlight=False)


@federation_app.callback()
def _federation() -> None:
    """Commands the consortium lead runs."""


# ------------------------------------------------------------------ init


INIT_HELP = (
    "Create a consortium in DIR: the CA (ECDSA P-384, 5 years), the SuperLink's TLS "
    "certificate signed by it (1 year, a SAN per --host), DIR/consortium.toml (address, "
    "port, database, certificate paths, MLflow, registered model) and the flwr CLI's "
    "connection profile (DIR/flwr).\n\n"
    "Nothing is overwritten: if DIR holds a consortium already, nothing is written. "
    "Afterwards, move DIR/pki/ca.key offline and send DIR/pki/ca.crt to every site."
    + _exit_codes(EXIT_USAGE)
)


@federation_app.command(
    help=INIT_HELP,
    short_help="Create a consortium: CA, SuperLink certificate, consortium.toml, flwr profile.",
)
@reports_errors
def init(
    directory: DirOption,
    host: Annotated[
        list[str],
        typer.Option(
            "--host",
            help="Name or IP address sites dial (repeat for several); the first is the one "
            "your flwr commands dial.",
        ),
    ],
    port: Annotated[int, typer.Option(help="The SuperLink's port (sites and flwr).")] = (
        DEFAULT_PORT
    ),
    listen: Annotated[
        str, typer.Option(help="Interface the SuperLink listens on (0.0.0.0: all).")
    ] = "0.0.0.0",
    mlflow_tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI; default: sqlite:///DIR/mlflow.db."),
    ] = None,
    mlflow_artifact_location: Annotated[
        str | None,
        typer.Option(
            help="Where runs' artifacts go; default: DIR/mlartifacts with the default "
            "tracking URI, else the tracking server's choice."
        ),
    ] = None,
    registered_model: Annotated[
        str,
        typer.Option(
            help="Registered model, one version per round; default: named after the model "
            "trained (busfed-wauve, busfed-keyframe2d)."
        ),
    ] = DEFAULT_REGISTERED_MODEL,
    name: Annotated[str, typer.Option(help="The consortium's name, in the CA's subject.")] = (
        "busfed"
    ),
) -> None:
    consortium = init_consortium(
        directory,
        hosts=host,
        port=port,
        listen=listen,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_artifact_location=mlflow_artifact_location,
        registered_model=registered_model,
        name=name,
    )
    pki = consortium.pki
    _console().print(
        f"Consortium [bold]{consortium.name}[/bold] set up in {consortium.dir}\n"
        f"  SuperLink: {consortium.address} (listens on {consortium.listen}:{consortium.port})\n"
        f"  MLflow: {consortium.mlflow_tracking_uri}\n"
        "\n[bold]Send to every site[/bold]: "
        f"{pki.ca_cert} and the address {consortium.address}\n"
        f"[bold]Move offline[/bold] (it signs every certificate): {pki.ca_key}\n"
        f"\nNext: busfed federation superlink --dir {consortium.dir}",
        soft_wrap=True,
    )


# ------------------------------------------------------------------ superlink


SUPERLINK_HELP = (
    "Run the consortium's SuperLink in the foreground: TLS with DIR/pki, SuperNode "
    "authentication (only enrolled sites connect), state in DIR/superlink.db, no package "
    "installs at run time. Ctrl-C or SIGTERM stops it and everything it started. This is "
    "what the systemd unit busfed-superlink.service runs."
    + _exit_codes(
        EXIT_USAGE + " (a certificate missing or expired)",
        EXIT_FEDERATION,
        "130  stopped by Ctrl-C or SIGTERM",
    )
)


@federation_app.command(
    help=SUPERLINK_HELP,
    short_help="Run the SuperLink in the foreground (TLS, node auth, state on disk).",
)
@reports_errors
def superlink(directory: DirOption) -> None:
    console = _console()
    serve_superlink(Consortium.load(directory), announce=lambda text: console.print(escape(text)))


# ------------------------------------------------------------------ enrol, revoke


ENROL_HELP = (
    "Enrol SITE: register its SuperNode public key PUBKEY (SITE.pub from `busfed site "
    "init`, ECDSA P-384 OpenSSH) with the running SuperLink, and append the enrolment (site, "
    "key fingerprint, node id, time) to DIR/enrolments.jsonl. Compare the fingerprint "
    "printed with the one the site reads you (ssh-keygen -lf SITE.pub).\n\n"
    "With --replace an enrolled site's key is replaced: the new key is registered, then the "
    "old node is unregistered." + _exit_codes(EXIT_USAGE, EXIT_FEDERATION)
)


@federation_app.command(help=ENROL_HELP, short_help="Enrol a site's SuperNode public key.")
@reports_errors
def enrol(
    site: Annotated[str, typer.Argument(metavar="SITE", help="The site's name.")],
    public_key: Annotated[
        Path, typer.Argument(metavar="PUBKEY", help="The site's SuperNode public key file.")
    ],
    directory: DirOption,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace the key of an enrolled site.")
    ] = False,
) -> None:
    events = enrol_site(Consortium.load(directory), site, public_key, replace=replace)
    new = events[0]
    console = _console()
    console.print(
        f"Enrolled [bold]{site}[/bold]: node {new.node_id}, key {new.fingerprint}", soft_wrap=True
    )
    for old in events[1:]:
        console.print(f"Unregistered its previous node {old.node_id} ({old.fingerprint})")
    console.print(
        f"Tell {site} to start its SuperNode; it shows as online in `busfed federation status`.",
        soft_wrap=True,
    )


REVOKE_HELP = (
    "Revoke SITE: unregister its node on the SuperLink. Its SuperNode is disconnected and "
    "refused at every later connection; the revocation is appended to "
    "DIR/enrolments.jsonl. To let the site back in, enrol a new key."
    + _exit_codes(EXIT_USAGE + " (SITE is not enrolled)", EXIT_FEDERATION)
)


@federation_app.command(
    help=REVOKE_HELP, short_help="Revoke a site: its SuperNode is disconnected and refused."
)
@reports_errors
def revoke(
    site: Annotated[str, typer.Argument(metavar="SITE", help="An enrolled site's name.")],
    directory: DirOption,
    reason: Annotated[str, typer.Option(help="Why, for the enrolment log.")] = "",
) -> None:
    event = revoke_site(Consortium.load(directory), site, reason=reason)
    _console().print(
        f"Revoked [bold]{site}[/bold]: node {event.node_id} ({event.fingerprint}) is "
        "unregistered and will be refused.",
        soft_wrap=True,
    )


# ------------------------------------------------------------------ renew-cert


RENEW_HELP = (
    "Reissue the SuperLink's TLS certificate from the consortium's CA, with a new key and "
    "the same names: sites need no change. The old certificate and key are kept as "
    "DIR/pki/server-<UTC time>.crt/.key. Restart the SuperLink afterwards."
    + _exit_codes(EXIT_USAGE + " (the CA key is missing or not the CA's, the CA expired)")
)


@federation_app.command(
    name="renew-cert",
    help=RENEW_HELP,
    short_help="Reissue the SuperLink certificate from the same CA.",
)
@reports_errors
def renew_cert(
    directory: DirOption,
    days: Annotated[
        int, typer.Option(min=1, max=3650, help="Lifetime of the new certificate.")
    ] = SERVER_LIFETIME.days,
    ca_key: Annotated[
        Path | None,
        typer.Option(help="The CA's private key, if kept offline; default: DIR/pki/ca.key."),
    ] = None,
) -> None:
    consortium = Consortium.load(directory)
    renewed = renew_server_certificate(consortium.pki, days=days, ca_key=ca_key)
    cert = renewed.certificate
    console = _console()
    console.print(
        f"New SuperLink certificate {consortium.pki.server_cert}: serial {cert.serial_number:x}, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d}\n"
        f"Kept the old one as {renewed.backup_cert} (key {renewed.backup_key})",
        soft_wrap=True,
    )
    if renewed.capped_at_ca_expiry:
        console.print(
            "[yellow]warning:[/yellow] capped at the CA's own expiry; plan a new CA.",
            soft_wrap=True,
        )
    console.print("Restart the SuperLink to serve it (systemctl restart busfed-superlink).")


# ------------------------------------------------------------------ start, stop, log


START_HELP = (
    "Start a training run: submit the busfed Flower app to the SuperLink and print its run "
    "id. MLflow, the registered model and the out-dir (DIR/runs/CAMPAIGN) come from "
    "DIR/consortium.toml; options left out take the app's defaults (pyproject.toml). Each "
    "site trains with its own privacy settings and refuses a round beyond its budget. "
    "With --wait it follows the run to its end and exits 0 only if every round produced a "
    "registered model."
    + _exit_codes(
        EXIT_USAGE,
        EXIT_FEDERATION + " (with --wait: the run failed, or a round produced no model)",
    )
)


@federation_app.command(help=START_HELP, short_help="Start a training run; print its run id.")
@reports_errors
def start(
    directory: DirOption,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds in this run.")],
    preset: Annotated[
        str | None, typer.Option(help="Model size: tiny (a dry run) or paper.")
    ] = None,
    local_steps: Annotated[
        int | None, typer.Option(min=1, help="DP-SGD steps per model per site per round.")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(min=1e-12, help="The sites' local learning rate.")
    ] = None,
    detector_learning_rate: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="The detector's own learning rate (0: --learning-rate); smaller keeps a "
            "pretrained detector's boxes through DP noise.",
        ),
    ] = None,
    classifier_trains: Annotated[
        str | None,
        typer.Option(
            help="Which of the classifier's (or key-frame model's) parameters the sites "
            "train: all (default), last-stage, norm or head (the head on frozen features).",
        ),
    ] = None,
    augment_views: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Augmented copies of each clip in a patient's gradient, averaged before "
            "clipping (1: none); costs that many times the sites' compute, no epsilon.",
        ),
    ] = None,
    min_sites: Annotated[
        int | None, typer.Option(min=1, help="Sites needed for a round to go ahead.")
    ] = None,
    proposed_noise_multiplier: Annotated[
        float | None,
        typer.Option(min=0.0, help="Proposed to sites; a site refuses one weaker than its own."),
    ] = None,
    proposed_sample_rate: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Proposed to sites, as above."),
    ] = None,
    campaign: Annotated[
        str | None,
        typer.Option(
            help="Name kept across restarts of one training campaign; default: named "
            "after the Flower run id."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue --campaign from its latest registered model version."
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="What to train: wauve (video), keyframe2d (key-frame comparator) or "
            "detector (WAUVE's detector alone; key-frame sites train it too)."
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Start a new campaign from this model version: a folder on the server's "
            "machine or models:/NAME/VERSION (e.g. busfed pretrain's version 0); default: "
            "seeded random weights."
        ),
    ] = None,
    trunk: Annotated[
        str | None,
        typer.Option(
            help="groupnorm (default) or frozen-bn: how the ResNet trunks are normalised; "
            "the --init model's trunk (frozen-bn for one started from ImageNet weights)."
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Follow the run to its end; exit 5 if a round produced no model."
        ),
    ] = False,
) -> None:
    launch = start_run(
        Consortium.load(directory),
        rounds=rounds,
        preset=preset,
        local_steps=local_steps,
        learning_rate=learning_rate,
        detector_learning_rate=detector_learning_rate,
        classifier_trains=classifier_trains,
        augment_views=augment_views,
        min_sites=min_sites,
        proposed_noise_multiplier=proposed_noise_multiplier,
        proposed_sample_rate=proposed_sample_rate,
        campaign=campaign,
        resume=resume,
        model=model,
        init_model=init,
        trunk=trunk,
    )
    console = _console()
    console.print(
        f"Run [bold]{launch.run_id}[/bold] submitted"
        + (f" (campaign {launch.campaign})" if launch.campaign else "")
        + f"; out-dir {launch.out_dir}\n"
        f"Watch it: busfed federation status --dir {directory}",
        soft_wrap=True,
    )
    if wait:
        summary = wait_for_run(Consortium.load(directory), launch, announce=console.print)
        versions = [str(r["model_version"]) for r in summary["rounds"]]
        console.print(f"Run {launch.run_id} finished: model versions {', '.join(versions)}")


STOP_HELP = "Stop RUN_ID, or the one run still active." + _exit_codes(
    EXIT_USAGE + " (no run or several runs active and none named)", EXIT_FEDERATION
)


@federation_app.command(help=STOP_HELP, short_help="Stop a run.")
@reports_errors
def stop(
    directory: DirOption,
    run_id: Annotated[int | None, typer.Argument(metavar="[RUN_ID]")] = None,
) -> None:
    stopped = stop_run(Consortium.load(directory), run_id)
    _console().print(f"Run {stopped} stopped.")


LOG_HELP = "Show the ServerApp's log of RUN_ID (default: the one run still active)." + (
    _exit_codes(EXIT_USAGE, EXIT_FEDERATION)
)


@federation_app.command(help=LOG_HELP, short_help="Show a run's ServerApp log.")
@reports_errors
def log(
    directory: DirOption,
    run_id: Annotated[int | None, typer.Argument(metavar="[RUN_ID]")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")
    ] = False,
) -> None:
    consortium = Consortium.load(directory)
    run_id = active_run(consortium) if run_id is None else run_id
    cli = consortium.cli()
    # Straight to the terminal: a followed log may run for hours.
    code = cli.passthrough("log", str(run_id), cli.profile, "--stream" if follow else "--show")
    if code:
        raise typer.Exit(code=5)


# ------------------------------------------------------------------ status


STATUS_HELP = (
    "Show the federation: each site's enrolment, whether its SuperNode is online, and the "
    "privacy it has spent (epsilon at delta, budget left, from the latest registered model "
    "version's tags; ? if not reported); the runs, their status and last recorded round; "
    "the latest registered model version."
    + _exit_codes(
        EXIT_USAGE,
        "5  the SuperLink could not be asked (the rest is still shown)",
        "6  MLflow could not be asked (the rest is still shown)",
    )
)


@federation_app.command(
    help=STATUS_HELP, short_help="Sites online, privacy spent, runs, latest model version."
)
@reports_errors
def status(
    directory: DirOption,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the status as JSON instead of tables.")
    ] = False,
) -> None:
    report = federation_status(Consortium.load(directory))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_status(report)
    if "superlink" in report["errors"]:
        raise typer.Exit(code=5)
    if "mlflow" in report["errors"]:
        raise typer.Exit(code=6)


def _num(value: float | None, spec: str = ".3g") -> str:
    return "?" if value is None else format(value, spec)


def _print_status(report: dict[str, Any]) -> None:
    console = _console()
    colour = {"online": "green", "offline": "yellow", "unregistered": "red"}
    sites = Table(title=f"sites of {report['consortium']} (SuperLink {report['superlink']})")
    # Names and ids are never cut short: they are what people copy and tell apart.
    sites.add_column(
        "site",
        no_wrap=True,
        min_width=len(max((s["site"] for s in report["sites"]), key=len, default="site")),
    )
    for column in ("enrolment", "SuperNode", "key", "ε spent", "δ", "budget"):
        sites.add_column(column)
    sites.add_column("left", justify="right")
    for site in report["sites"]:
        node = site["node_status"]
        sites.add_row(
            site["site"],
            site["enrolment"],
            f"[{colour.get(node, 'default')}]{node}[/]" if node else "?",
            (site["fingerprint"] or "-")[:15],
            _num(site["epsilon"]),
            _num(site["delta"], "g"),
            _num(site["epsilon_budget"], "g"),
            _num(site["budget_left"]),
        )
    console.print(sites)
    for node in report["unknown_nodes"]:
        console.print(
            f"[yellow]node {node['node_id']} ({node['status']}) is registered but not in "
            "the enrolment log[/]"
        )
    runs = Table(title="runs")
    runs.add_column("run", no_wrap=True, min_width=20)  # Flower run ids have up to 20 digits
    for column in ("status", "campaign", "rounds done", "last version", "out-dir"):
        runs.add_column(column)
    for run in report["runs"]:
        planned = run["rounds"]
        done = run["last_round"]
        runs.add_row(
            str(run["run_id"]),
            run["status"],
            run["campaign"] or "-",
            f"{done or 0}/{planned}" if planned else str(done or "-"),
            str(run["last_round_version"] or "-"),
            run["out_dir"] or "-",
        )
    console.print(runs)
    for run in report["runs"]:
        if run["status"].startswith("running") and run.get("round_states"):
            console.print(f"run {run['run_id']}, {describe_site_states(run['round_states'])}")
    model = report["model"]
    if model:
        console.print(
            f"latest model: {model['name']} version {model['version']} (campaign "
            f"{model['campaign'] or '?'}, round {model['round'] or '?'}, sites "
            f"{model['sites'] or '?'}, {model['created_at']})",
            soft_wrap=True,
        )
    else:
        console.print("latest model: none registered yet")
    for what, error in report["errors"].items():
        console.print(f"[red]{what}:[/red] {escape(error)}", soft_wrap=True)
