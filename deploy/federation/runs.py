"""Runs: start the busfed Flower app on the SuperLink, follow it, stop it, judge its end.

Flower keeps the runs (``flwr run|list|stop``); the launch log adds which run belongs to
which campaign and out-dir, and ``check_finished_run`` reads the ServerApp's summary,
because Flower's status alone does not say whether every round produced a model.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from common.errors import FederationError, UsageError
from common.models.trainable import check_trains
from common.site_states import format_site_names
from deploy.federation.consortium import NAME_PATTERN, Consortium
from deploy.federation.enrolment import enrolled_sites, read_enrolments
from deploy.federation.logs import append_line, read_jsonl
from deploy.launcher import APP_DIR


class LaunchRecord(BaseModel):
    """One line of the launch log: a run the lead started."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: int
    campaign: str
    out_dir: Path
    at: dt.datetime
    run_config: dict[str, Any]


def app_run_config(app_dir: Path) -> dict[str, Any]:
    """The Flower app's run config and its defaults (``[tool.flwr.app.config]``)."""
    path = app_dir / "pyproject.toml"
    try:
        config = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    except FileNotFoundError as exc:
        raise FederationError(
            f"the Flower app is not at {app_dir} (install busfed editable: pip install -e)"
        ) from exc
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise FederationError(f"{path}: no readable [tool.flwr.app.config]: {exc}") from exc
    return dict(config)


def run_config_for(
    consortium: Consortium,
    *,
    rounds: int,
    out_dir: Path,
    app_config: Mapping[str, Any],
    **options: Any,
) -> dict[str, Any]:
    """The run config ``start_run`` submits: the consortium's tracking settings, the
    out-dir, and each option that is not None (``local_steps`` -> ``local-steps``).

    Raises
    ------
    UsageError
        An option the app does not declare in its ``[tool.flwr.app.config]``.
    """
    given = {key.replace("_", "-"): value for key, value in options.items() if value is not None}
    run_config = {
        "num-server-rounds": rounds,
        **given,
        "mlflow-tracking-uri": consortium.mlflow_tracking_uri,
        "mlflow-artifact-location": consortium.mlflow_artifact_location,
        "registered-model": consortium.registered_model,
        "out-dir": str(out_dir),
    }
    unknown = [key for key in run_config if key not in app_config]
    if unknown:
        flags = ", ".join(f"--{key}" if key in given else key for key in unknown)
        raise UsageError(f"the Flower app does not accept {flags} (not in its run config)")
    return run_config


def read_launches(path: Path) -> list[LaunchRecord]:
    return read_jsonl(path, LaunchRecord)


def _checked_trunk(trunk: str) -> str:
    from common.models.detector import check_trunk  # torch: only when asked

    return check_trunk(trunk)


def start_run(
    consortium: Consortium,
    *,
    rounds: int,
    preset: str | None = None,
    local_steps: int | None = None,
    learning_rate: float | None = None,
    detector_learning_rate: float | None = None,
    classifier_trains: str | None = None,
    augment_views: int | None = None,
    min_sites: int | None = None,
    proposed_noise_multiplier: float | None = None,
    proposed_sample_rate: float | None = None,
    campaign: str | None = None,
    resume: bool = False,
    model: str | None = None,
    init_model: str | None = None,
    trunk: str | None = None,
    app_dir: Path | None = None,
    now: dt.datetime | None = None,
) -> LaunchRecord:
    """Submit the busfed Flower app to the SuperLink; return the launch, with its run id.

    Options left at None take the app's defaults. The out-dir is
    ``<out_dir>/<campaign>`` (``<out_dir>/<UTC time>`` without a campaign); MLflow and
    the registered model come from the consortium file.

    Raises
    ------
    UsageError
        ``resume`` without a campaign, a bad campaign name or preset, an option the app
        does not know.
    FederationError
        The SuperLink refused the run or is unreachable.
    """
    app_dir = APP_DIR if app_dir is None else app_dir
    if resume and init_model:
        raise UsageError("--init starts a new campaign; --resume continues one from its versions")
    if resume and not campaign:
        raise UsageError("--resume needs --campaign NAME: the campaign to continue")
    if campaign is not None and not re.match(NAME_PATTERN, campaign):
        raise UsageError(f"--campaign {campaign!r}: use letters, digits, '.', '_' and '-' only")
    if preset is not None:
        from common.models.presets import PRESETS

        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r}: one of {', '.join(sorted(PRESETS))}")
    now = now or dt.datetime.now(dt.UTC)
    out_dir = consortium.out_dir / (campaign or f"{now:%Y%m%dT%H%M%SZ}")
    # The ServerApp's logs and round records then name sites, not 19-digit node ids.
    enrolled = enrolled_sites(read_enrolments(consortium.enrolment_log))
    site_names = format_site_names({event.node_id: site for site, event in enrolled.items()})
    run_config = run_config_for(
        consortium,
        rounds=rounds,
        out_dir=out_dir,
        app_config=app_run_config(app_dir),
        preset=preset,
        local_steps=local_steps,
        learning_rate=learning_rate,
        detector_learning_rate=detector_learning_rate,
        classifier_trains=None if classifier_trains is None else check_trains(classifier_trains),
        augment_views=augment_views,
        min_sites=min_sites,
        proposed_noise_multiplier=proposed_noise_multiplier,
        proposed_sample_rate=proposed_sample_rate,
        campaign=campaign,
        resume=True if resume else None,
        model=model,
        init_model=init_model,
        trunk=None if trunk is None else _checked_trunk(trunk),
        site_names=site_names or None,
    )
    run_id = consortium.cli().submit(app_dir, run_config)
    record = LaunchRecord(
        run_id=run_id, campaign=campaign or "", out_dir=out_dir, at=now, run_config=run_config
    )
    append_line(consortium.launch_log, record.model_dump_json())
    return record


def check_finished_run(run_id: int, status: str, out_dir: Path) -> dict[str, Any]:
    """The summary of a finished run whose every round produced a model; else raise.

    Flower's status alone does not say it: a run whose rounds aggregated nothing used to
    end "finished:completed". The ServerApp writes its ``outcome`` into
    ``out_dir/summary.json`` (and fails the run when it is not ok).

    Raises
    ------
    FederationError
        The run failed or was stopped, wrote no summary, or trained fewer rounds than asked;
        the message gives the reason and where the logs are.
    """
    path = out_dir / "summary.json"
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    outcome = summary.get("outcome") or {}
    if not status.startswith("finished:completed"):
        reason = outcome.get("reason") or "see the ServerApp's log (busfed federation log)"
        raise FederationError(f"run {run_id} ended as {status}: {reason}")
    if not summary:
        raise FederationError(f"run {run_id}: the ServerApp wrote no readable {path}")
    if not outcome.get("ok"):
        raise FederationError(f"run {run_id}: {outcome.get('reason', 'no outcome recorded')}")
    return summary


def wait_for_run(
    consortium: Consortium,
    launch: LaunchRecord,
    *,
    announce: Any = print,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Follow a launched run to its end, announcing each round; return its summary.

    Raises
    ------
    FederationError
        As ``check_finished_run``, or the run did not end within ``timeout_s``.
    """
    cli = consortium.cli()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        runs = cli.runs(launch.run_id)
        status = str(runs[0].get("status", "")) if runs else ""
        rounds_log = launch.out_dir / "rounds.jsonl"
        lines = rounds_log.read_text().splitlines() if rounds_log.exists() else []
        for line in lines[shown:]:
            r = json.loads(line)
            announce(
                f"round {r['round']}: model version {r['model_version']}, sites "
                f"{', '.join(sorted(r['sites'])) or 'none'}"
                + (f", no update from {', '.join(r['dropped'])}" if r["dropped"] else "")
            )
        shown = len(lines)
        if status.startswith("finished"):
            return check_finished_run(launch.run_id, status, launch.out_dir)
        if deadline is not None and time.monotonic() > deadline:
            raise FederationError(f"run {launch.run_id} did not finish in {timeout_s:.0f} s")
        time.sleep(poll_s)


def active_run(consortium: Consortium) -> int:
    """The id of the one run that has not finished; UsageError if none or several."""
    runs = [r for r in consortium.cli().runs() if not str(r["status"]).startswith("finished")]
    if not runs:
        launches = read_launches(consortium.launch_log)
        latest = f"; the latest run started here is {launches[-1].run_id}" if launches else ""
        raise UsageError(f"no run is active on {consortium.address}{latest}: name a RUN_ID")
    if len(runs) > 1:
        listed = ", ".join(f"{r['run-id']} ({r['status']})" for r in runs)
        raise UsageError(f"several runs are active: {listed}; name one RUN_ID")
    return int(runs[0]["run-id"])


def stop_run(consortium: Consortium, run_id: int | None = None) -> int:
    """Stop ``run_id``, or the one active run; return the id stopped."""
    run_id = active_run(consortium) if run_id is None else run_id
    consortium.cli().stop_run(run_id)
    return run_id
