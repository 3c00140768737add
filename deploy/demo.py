"""`busfed demo`: three synthetic hospitals, a real federation on 127.0.0.1, end to end.

Every part is the real one: PyAV videos, a consortium CA and TLS, SuperNode
authentication, Flower's SecAgg+, Opacus DP-SGD at each site, MLflow with SQLite.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from common.config import (
    SiteConfig,
    SiteIdentity,
    SitePrivacy,
    SiteTraining,
    render_site_config,
)
from common.data.manifest import MANIFEST, load_site
from common.errors import FederationError, UsageError
from common.keys import create_signing_key
from common.privacy.ledger import LEDGER_FILE
from common.privacy.settings import DPSettings
from common.site_states import describe_site_states, format_site_names, read_site_states
from deploy.audit.report import write_report
from deploy.audit.verify import verify_ledgers
from deploy.demo_consortium import lay_out_consortium, log_launch
from deploy.demo_settings import DemoSettings
from deploy.federation.runs import check_finished_run
from deploy.heldout import HeldOutScore, score_version
from deploy.launcher import APP_DIR, LocalFederation
from deploy.pki import NodeKeys, create_consortium_pki, create_node_keys
from deploy.synth import generate_site

SITE_NAMES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")
VENDORS = ("vendor-a", "vendor-b", "vendor-c")
# Malignant and benign patients a demo hospital holds at least (16 patients at seed 8 drew
# no malignant one).
MIN_PER_CLASS = 3
# Below this many pooled validation patients the round table says its val AUC is noise.
MIN_VAL_PATIENTS = 30


def demo_site_config(
    name: str,
    site_dir: Path,
    *,
    require_secure_aggregation: bool = True,
    data: Path = Path("data"),
) -> SiteConfig:
    """What a cautious hospital would write: every privacy value stated explicitly."""
    model = DPSettings(noise_multiplier=1.5, max_grad_norm=1.0, sample_rate=0.3)
    return SiteConfig(
        site=SiteIdentity(name=name, data=data, state=Path("state"), device="auto", threads=1),
        privacy=SitePrivacy(
            privacy_unit="patient",
            epsilon_budget=8.0,
            delta=1e-5,
            accountant="rdp",
            require_secure_aggregation=require_secure_aggregation,
            secure_rng=True,  # the product path, with its cost
            detector=model,
            classifier=model,
            keyframe=model,  # the comparator, should the consortium run it
        ),
        training=SiteTraining(frame_stride=2, max_frames_per_video=16, max_local_steps=3),
    )


def real_sites(root: Path) -> list[Path]:
    """The site datasets under ``root`` (``busfed site ingest`` outputs), one per hospital.

    Raises
    ------
    UsageError
        ``root`` holds fewer than 3 or more than 5 of them.
    """
    found = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []
    if not 3 <= len(found) <= len(SITE_NAMES):
        raise UsageError(
            f"--data-from {root}: needs 3 to {len(SITE_NAMES)} site datasets (folders with a "
            f"{MANIFEST}, as busfed site ingest writes them), found {len(found)}"
        )
    return found


def prepare_sites(out: Path, settings: DemoSettings, console: Console) -> list[Path]:
    """Each hospital's data set (synthesised, or ingested and read in place), key pair and
    config; return the config paths."""
    sources = real_sites(settings.data_from) if settings.data_from is not None else None
    if sources is not None and len(sources) != settings.sites:
        raise UsageError(f"{settings.sites} sites asked for, {len(sources)} found in --data-from")
    configs = []
    for i in range(settings.sites):
        name = sources[i].name if sources else SITE_NAMES[i]
        site_dir = out / "sites" / name
        data = Path("data")
        if sources:
            data = sources[i].resolve()
            site = load_site(data, check_videos=False)
            malignant = sum(row.label == "malignant" for row in site.rows)
            patients = len({row.patient_id for row in site.rows})
            console.print(
                f"  {name}: {patients} patients, {len(site.rows)} videos or key frames, "
                f"{malignant} malignant, read in place from {data}"
            )
        else:
            with console.status(f"synthesising {name} ({VENDORS[i % len(VENDORS)]})"):
                summary = generate_site(
                    site_dir / "data",
                    site=name,
                    patients=settings.patients,
                    seed=settings.seed + i,
                    vendor=VENDORS[i % len(VENDORS)],
                    frames=settings.frames,
                    size=settings.size,
                    # Both classes at every hospital, in validation too: else its AUC is
                    # undefined. At most a quarter of a site is redrawn; tests' tiny sites
                    # keep their draws.
                    min_per_class=MIN_PER_CLASS if settings.patients >= 4 * MIN_PER_CLASS else 0,
                )
            console.print(
                f"  {name}: {summary.n_patients} patients, {summary.n_videos} videos, "
                f"{summary.n_malignant} malignant, {summary.vendor}"
            )
        create_node_keys(site_dir / "keys", site=name)
        _, ledger_public = create_signing_key(site_dir / "keys", site=name)
        # The consortium enrols the site's ledger public key (the private key stays home).
        enrolled = out / "consortium" / "ledger-keys"
        enrolled.mkdir(parents=True, exist_ok=True)
        shutil.copy(ledger_public, enrolled / ledger_public.name)
        path = site_dir / "site.toml"
        config = demo_site_config(
            name, site_dir, require_secure_aggregation=settings.secure_aggregation, data=data
        )
        path.write_text(render_site_config(config))
        configs.append(path)
    return configs


def prepare_held_out(out: Path, settings: DemoSettings, console: Console) -> Path | None:
    """A synthetic hospital that never trains (no keys, no config): the demo's external
    test set, scored with every version after the run. None when not asked for, or when
    the demo federates ingested real sites."""
    if not settings.held_out_patients or settings.data_from is not None:
        return None
    folder = out / "held-out" / "data"
    n = settings.held_out_patients
    with console.status("synthesising the held-out hospital"):
        summary = generate_site(
            folder, site="held-out", patients=n, seed=settings.seed + 500,
            vendor=VENDORS[settings.sites % len(VENDORS)], frames=settings.frames,
            size=settings.size, min_per_class=min(n // 4, max(MIN_PER_CLASS, n // 5)),
        )  # fmt: skip
    console.print(
        f"  held-out hospital (never trains, scores every version): {summary.n_patients} "
        f"patients, {summary.n_videos} videos, {summary.n_malignant} malignant, "
        f"{summary.vendor}"
    )
    return folder


def pretrain_start(out: Path, settings: DemoSettings, console: Console) -> DemoSettings:
    """The consortium's version 0, as ``busfed pretrain`` makes it: the demo's model
    trained centrally on synthetic public patients (their own seeds, no hospital's),
    written to ``out/pretrain/model``; the settings with ``init`` pointing at it.

    Unchanged settings when the demo starts from ``--init``, federates real sites, or is
    asked not to pretrain (``pretrain_patients`` 0).
    """
    if settings.init or not settings.pretrain_patients or settings.data_from is not None:
        return settings
    import torch

    from common.models.bundle import build_bundle
    from common.models.loading import save_bundle_dir
    from deploy.pretrain import Settings, pretrain, synthesise_public
    from deploy.pretrain_cli import pretraining_progress, print_pretraining
    from server.tracking import model_card

    folder = out / "pretrain"
    with console.status(f"synthesising {settings.pretrain_patients} public patients"):
        data_sets = synthesise_public(
            folder / "synthetic", patients=settings.pretrain_patients,
            seed=settings.seed + 1000, frames=settings.frames, size=settings.size,
        )  # fmt: skip
    bundle = build_bundle(settings.preset, seed=settings.seed, model=settings.model)
    training = Settings(
        steps=settings.pretrain_steps, batch_size=16, lr=1e-3, weight_decay=1e-4,
        seed=settings.seed, detector_steps=settings.pretrain_detector_steps, detector_lr=3e-3,
    )  # fmt: skip
    # One thread, as each site trains: two torch threads beside two busy processes on two
    # cores spun for 90 minutes in a pretraining that takes 4 when the machine is idle.
    torch.set_num_threads(1)
    with pretraining_progress(console) as progress:
        section = pretrain(bundle, data_sets, training, progress=progress)
    card = {**model_card(bundle), "round": 0, "pretraining": section}
    save_bundle_dir(bundle, folder / "model", card)
    print_pretraining(section, folder / "model", console)
    return replace(settings, init=str(folder / "model"))


def site_keys(config_path: Path) -> NodeKeys:
    """The key pair `prepare_sites` wrote beside a site's config."""
    site = config_path.parent.name
    return NodeKeys(
        config_path.parent / "keys" / f"{site}.key", config_path.parent / "keys" / f"{site}.pub"
    )


def start_sites(fed: LocalFederation, configs: list[Path]) -> dict[int, str]:
    """Enrol each site's public key, start its SuperNode, wait until all are online.

    Returns the site of each node id the SuperLink gave.
    """
    enrolled = {}
    for path in configs:
        site = path.parent.name
        enrolled[fed.register(site, site_keys(path))] = site
        fed.start_supernode(site, site_keys(path), node_config={"site-config": str(path)})
    wait_online(fed, len(configs), timeout=120)
    return enrolled


def run_config_for(
    out: Path, settings: DemoSettings, site_names: dict[int, str] | None = None
) -> dict[str, Any]:
    """The ServerApp's run config: everything the consortium proposes for this run, and
    which site holds which node (so that logs name sites, not node ids)."""
    return {
        "num-server-rounds": settings.rounds,
        "preset": settings.preset,
        "model": settings.model,
        "secure-aggregation": settings.secure_aggregation,
        "min-sites": max(2, settings.sites - 1),
        "local-steps": settings.local_steps,
        "learning-rate": settings.learning_rate,
        "detector-learning-rate": settings.detector_learning_rate,
        "classifier-trains": settings.classifier_trains,
        "augment-views": settings.augment_views,
        "mlflow-tracking-uri": f"sqlite:///{out / 'mlflow.db'}",
        "mlflow-artifact-location": str(out / "mlartifacts"),
        "out-dir": str(out),
        "seed": settings.seed,
        "secagg-timeout": settings.secagg_timeout,
        "secagg-timeout-limit": settings.secagg_timeout_limit,
        "secagg-timeout-factor": 3.0,
        "init-model": settings.init,
        "site-names": format_site_names(site_names or {}),
    }


def wait_online(fed: LocalFederation, n: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = json.loads(fed.flwr("supernode", "list", "busfed", "--format", "json"))["nodes"]
        if sum(node["status"] == "online" for node in nodes) >= n:
            return
        check_superlink(fed)
        time.sleep(1)
    raise FederationError(f"fewer than {n} sites came online in {timeout:.0f} s")


def check_superlink(fed: LocalFederation) -> None:
    """Raise if a process the watchdog does not restart (the SuperLink) has died; a
    SuperNode that dies is the watchdog's to restart."""
    for proc in list(fed.processes):
        if proc.name not in fed.launch and not proc.alive():
            raise FederationError(f"{proc.name} died:\n{proc.tail()}")


def round_table(rounds: list[dict[str, Any]], held_out: dict[str, Any] | None = None) -> Table:
    """One row per round; with a held-out hospital, a first row for the start (round 0)
    and each version's score on it (AUC, or AP for a detector, with its 95% CI)."""
    table = Table(title="federated rounds", box=box.SIMPLE_HEAD, pad_edge=False)
    scores = {s["round"]: HeldOutScore.from_json(s) for s in (held_out or {}).get("scores", [])}
    metric = next(iter(scores.values())).metric if scores else ""
    # Each network of the model the campaign trains (WAUVE's two, or the comparator).
    networks = [
        key
        for key in ("detector_loss", "classifier_loss", "keyframe_loss")
        if any(r["metrics"].get(key) is not None for r in rounds)
    ]
    short = {"detector_loss": "det", "classifier_loss": "cls", "keyframe_loss": "2D"}
    losses = "loss " + " / ".join(short[key] for key in networks)
    # Narrow enough for an 80-column terminal: the version is the round's line above.
    columns = ["round", "sites", losses if networks else "loss", "val AUC", "max ε", "s"]
    if scores:
        columns.insert(4, f"held-out {metric} (95% CI)")
    for col in columns:
        table.add_column(col, justify="right")
    if 0 in scores:
        start = scores[0].version
        name = "seeded" if start == "seeded weights" else "start"
        table.add_row("0", name, "-", "-", scores[0].text(), "-", "-")
    for r in rounds:
        m = r["metrics"]

        def fmt(key: str, spec: str = ".3f", m: dict[str, Any] = m) -> str:
            return format(m[key], spec) if m.get(key) is not None else "-"

        cells = [
            str(r["round"]),
            f"{len(r['sites'])}" + (f" ({len(r['dropped'])} out)" if r["dropped"] else ""),
            " / ".join(fmt(key) for key in networks) or "-",
            fmt("pooled_patient_val_auc"),
            fmt("epsilon_max", ".2f"),
            fmt("round_seconds", ".0f"),
        ]
        if scores:
            held = scores.get(int(r["round"]))
            cells.insert(4, held.text() if held else "-")
        table.add_row(*cells)
    # A demo site validates on a handful of patients: say how many stand behind the AUC.
    val_patients = [r["metrics"]["val_patients"] for r in rounds if "val_patients" in r["metrics"]]
    if val_patients:
        n = int(val_patients[-1])
        table.caption = f"val AUC: the sites' {n} validation patients pooled" + (
            "; too few to compare rounds" if n < MIN_VAL_PATIENTS else ""
        )
    return table


def run_demo(
    out: Path, settings: DemoSettings, console: Console | None = None, *, replace: bool = False
) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return the summary written to summary.json.

    A previous demo in ``out`` (its privacy ledgers, accountants, registry) is never
    overwritten silently: pass ``replace=True`` to delete it first.
    """
    console = console or Console()
    out = out.resolve()
    if settings.init and ":/" not in settings.init and not Path(settings.init).is_dir():
        # Found now, not by the ServerApp minutes later.
        raise UsageError(f"--init {settings.init}: no model version folder there")
    if out.exists() and any(out.iterdir()):
        if not replace:
            raise UsageError(f"{out} is not empty; choose another --out or pass --replace")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (APP_DIR / "pyproject.toml").exists():
        raise FederationError(f"the Flower app is not at {APP_DIR} (install busfed editable)")
    started = time.monotonic()
    console.rule("busfed demo")
    configs = prepare_sites(out, settings, console)
    held_out = prepare_held_out(out, settings, console)
    settings = pretrain_start(out, settings, console)
    pki = create_consortium_pki(out / "pki", hosts=["127.0.0.1", "localhost"])
    rounds_log = out / "rounds.jsonl"
    rounds_log.unlink(missing_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    with LocalFederation(out / "federation", pki) as fed:
        fed.start_superlink(database=out / "federation" / "superlink.db")
        console.print(f"SuperLink on https://{fed.address} (TLS, SuperNode auth)")
        enrolled = start_sites(fed, configs)
        consortium = lay_out_consortium(out, fed, enrolled, configs, site_keys)
        fed.start_watchdog()
        console.print(f"{settings.sites} sites online; launching {settings.rounds} rounds")
        run_config = run_config_for(out, settings, enrolled)
        run_id = fed.run(APP_DIR, run_config)
        log_launch(consortium, run_id, out, run_config)
        console.print(f"The lead's view while it runs: busfed federation status --dir {consortium}")
        status = watch_run(fed, run_id, rounds_log, settings, console)
        restarts = [r.as_json() for r in fed.watchdog.restarts] if fed.watchdog else []
    summary_path = out / "summary.json"
    try:
        summary = check_finished_run(run_id, status, out)
    except FederationError as exc:
        raise FederationError(f"{exc}; logs in {out / 'federation' / 'logs'}") from exc
    summary["watchdog_restarts"] = restarts
    summary["audit"] = audit(out, configs, summary, console)
    if held_out is not None:
        summary["held_out"] = score_held_out(out, held_out, settings, summary, console)
    summary["wall_seconds"] = time.monotonic() - started
    summary["flower_run_id"] = run_id
    summary_path.write_text(json.dumps(summary, indent=2))
    report(summary, out, console)
    return summary


class RoundProgress(Progress):
    """The rounds' progress bar with, under it, each site's state in the round in progress
    (waiting, training, update sent, dropped with the reason: the ServerApp's sites.json)."""

    sites = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.sites:
            yield Text(self.sites, style="dim")


def watch_run(
    fed: LocalFederation, run_id: int, rounds_log: Path, settings: DemoSettings, console: Console
) -> str:
    """Follow the run until it finishes, printing each round as the server records it."""
    shown = restarted = 0
    deadline = time.monotonic() + settings.timeout_s
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
    )
    with RoundProgress(*columns, console=console) as progress:
        task = progress.add_task("federated training", total=settings.rounds)
        while True:
            status = str(fed.run_status(run_id).get("status", ""))
            states = read_site_states(rounds_log.parent)
            progress.sites = describe_site_states(states) if states else "sites: waiting"
            lines = rounds_log.read_text().splitlines() if rounds_log.exists() else []
            for line in lines[shown:]:
                r = json.loads(line)
                eps = ", ".join(
                    f"{s} ε={v['epsilon']:.2f}"
                    for s, v in sorted(r["sites"].items())
                    if "epsilon" in v
                )
                progress.console.print(
                    f"round {r['round']}: version {r['model_version']}, {eps}"
                    + (f", no update from: {', '.join(r['dropped'])}" if r["dropped"] else "")
                    + (f", errors: {r['failures']}" if r["failures"] else "")
                )
            shown = len(lines)
            progress.update(task, completed=min(shown, settings.rounds))
            if status.startswith("finished"):
                return status
            check_superlink(fed)
            restarts = fed.watchdog.restarts if fed.watchdog else []
            for r in restarts[restarted:]:
                progress.console.print(f"watchdog: restarted {r.name} ({r.reason})")
            restarted = len(restarts)
            if time.monotonic() > deadline:
                fed.flwr("stop", str(run_id), "busfed")
                raise FederationError(f"run {run_id} did not finish in {settings.timeout_s:.0f} s")
            time.sleep(2)


def score_held_out(
    out: Path, folder: Path, settings: DemoSettings, summary: dict[str, Any], console: Console
) -> dict[str, Any]:
    """Score the held-out hospital with the start (round 0) and every round's version."""
    from common.models.bundle import build_bundle
    from server.registry import load_model

    site = load_site(folder)
    uri = summary["mlflow_tracking_uri"]
    versions: list[tuple[int, str]] = [(0, settings.init or "seeded weights")]
    versions += [
        (int(r["round"]), f"models:/{summary['registered_model']}/{r['model_version']}")
        for r in summary["rounds"]
    ]
    scores: list[HeldOutScore] = []
    with console.status("scoring the held-out hospital") as status:
        for server_round, model in versions:
            status.update(f"scoring the held-out hospital with round {server_round}'s model")
            if settings.init or server_round:
                bundle, _ = load_model(model, tracking_uri=uri)
            else:
                bundle = build_bundle(settings.preset, seed=settings.seed, model=settings.model)
            score = score_version(
                bundle, site, round=server_round, version=model,
                out=out / "held-out" / f"round-{server_round}",
            )  # fmt: skip
            scores.append(score)
    return {
        "data": str(folder),
        "patients": len({row.patient_id for row in site.rows}),
        "videos": len(site.rows),
        "malignant_videos": sum(row.label == "malignant" for row in site.rows),
        "scores": [score.as_json() for score in scores],
    }


def audit(
    out: Path, configs: list[Path], summary: dict[str, Any], console: Console
) -> dict[str, Any]:
    """What an auditor would do: verify every site's ledger against the enrolled keys,
    recompute each epsilon independently, and write the HTML report."""
    ledgers = [path.parent / "state" / LEDGER_FILE for path in configs]
    missing = [p.parent.parent.name for p in ledgers if not p.exists()]
    if missing:
        console.print(f"no privacy ledger (never trained): {', '.join(missing)}")
    ledgers = [p for p in ledgers if p.exists()]
    if not ledgers:
        return {"ok": False, "report": None, "ledgers": [], "missing": missing}
    result = verify_ledgers(ledgers, out / "consortium" / "ledger-keys")
    versions = {int(r["round"]): str(r["model_version"]) for r in summary["rounds"]}
    report_path = out / "audit" / "report.html"
    write_report(result, report_path, versions=versions)
    verdict = "[green]verified[/green]" if result.ok else "[red]FAILED[/red]"
    console.print(f"privacy ledgers: {verdict}; audit report {report_path}")
    return {
        "ok": result.ok,
        "report": str(report_path),
        "ledgers": [str(p) for p in ledgers],
        "missing": missing,
    }


def mlflow_ui_command(tracking_uri: str) -> str:
    """The MLflow UI for the demo's registry. One worker: with the default four, the
    workers of a loaded two-core machine missed their start-up deadline and were killed and
    restarted for minutes ("Child process ... died"); one served in under a minute."""
    return f"mlflow ui --workers 1 --backend-store-uri {tracking_uri}"


def report(summary: dict[str, Any], out: Path, console: Console) -> None:
    held_out = summary.get("held_out")
    console.print(round_table(summary["rounds"], held_out))
    if held_out:
        console.print(
            f"held-out hospital: {held_out['patients']} patients, {held_out['videos']} videos "
            f"({held_out['malignant_videos']} malignant), never trained on; every video "
            "scored as busfed evaluate --split all does (no tracked lesion: score 0), files "
            f"in {out / 'held-out'}"
        )
    sites = Table(title="privacy spent (patient-level)")
    for col in ("site", "ε", "δ", "budget"):
        sites.add_column(col, justify="right")
    for s in summary["sites"]:
        sites.add_row(
            s["name"], f"{s['epsilon']:.3f}", f"{s['delta']:g}", f"{s['epsilon_budget']:g}"
        )
    console.print(sites)
    console.print(
        f"summary: {out / 'summary.json'}\n"
        f"registered model: {summary['registered_model']} "
        f"(versions {', '.join(str(r['model_version']) for r in summary['rounds'])})\n"
        f"MLflow UI: {mlflow_ui_command(summary['mlflow_tracking_uri'])}\n"
        f"the lead's commands on it: busfed federation status --dir {out / 'consortium'}\n"
        f"wall time: {summary['wall_seconds']:.0f} s"
    )
