"""Status: the federation's sites, runs and latest model, as far as each can be learnt.

``busfed federation status`` asks the SuperLink (nodes, runs), MLflow (the latest registered
version and its privacy tags) and the consortium's logs at once; what could not be asked is
reported, and the rest is still shown.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.errors import FederationError, TrackingError
from common.site_states import read_site_states
from deploy.federation.consortium import DEFAULT_MODEL, Consortium
from deploy.federation.enrolment import enrolled_sites, read_enrolments
from deploy.federation.runs import read_launches


def last_round(out_dir: Path) -> dict[str, Any] | None:
    """The last round the ServerApp recorded in ``out_dir/rounds.jsonl``, or None."""
    try:
        lines = [x for x in (out_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
        return dict(json.loads(lines[-1])) if lines else None
    except (OSError, ValueError):
        return None


def latest_model_version(consortium: Consortium, name: str) -> dict[str, Any] | None:
    """Registered model ``name``'s newest version and its tags, or None if there is none.

    Raises
    ------
    TrackingError
        MLflow could not be asked.
    """
    uri = consortium.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # nothing recorded yet; asking would create an empty database
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(
            f"name = '{name}'"
        )
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {uri}: {exc}") from exc
    if not versions:
        return None
    latest = max(versions, key=lambda v: int(v.version))
    return {
        "name": name,
        "version": str(latest.version),
        "created_at": dt.datetime.fromtimestamp(
            latest.creation_timestamp / 1000, dt.UTC
        ).isoformat(),
        "tags": dict(latest.tags),
    }


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def site_privacy(tags: Mapping[str, str], site: str) -> dict[str, float | None]:
    """A site's epsilon spent, delta, budget and budget left, from a version's tags."""
    epsilon = _float(tags.get(f"epsilon.{site}"))
    budget = _float(tags.get(f"epsilon_budget.{site}"))
    return {
        "epsilon": epsilon,
        "delta": _float(tags.get(f"delta.{site}")),
        "epsilon_budget": budget,
        "budget_left": None if epsilon is None or budget is None else budget - epsilon,
    }


def federation_status(consortium: Consortium) -> dict[str, Any]:
    """Sites, runs and the latest model, as far as each can be learnt.

    ``errors`` lists what could not be asked (``superlink``, ``mlflow``), with why.
    """
    errors: dict[str, str] = {}
    cli = consortium.cli()
    launches = {record.run_id: record for record in read_launches(consortium.launch_log)}
    latest = max(launches.values(), key=lambda r: r.at, default=None)
    # The registered model of what was launched last (the app's default model before that).
    kind = str(latest.run_config.get("model", DEFAULT_MODEL)) if latest else DEFAULT_MODEL
    registered_model = consortium.registered_model_for(kind)
    nodes: dict[int, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    model = None
    # Each flwr call starts an interpreter (seconds), and MLflow is slow to import: ask
    # all three at once.
    with ThreadPoolExecutor(max_workers=3) as pool:
        asked_nodes, asked_runs = pool.submit(cli.nodes), pool.submit(cli.runs)
        asked_model = pool.submit(latest_model_version, consortium, registered_model)
        try:
            nodes = {int(n["node-id"]): n for n in asked_nodes.result()}
            runs = asked_runs.result()
        except FederationError as exc:
            errors["superlink"] = str(exc)
            # What was launched is still known from the launch log (the demo's consortium
            # folder after the demo has stopped its SuperLink, say).
            runs = [{"run-id": i, "status": "? (SuperLink not reached)"} for i in launches]
        try:
            model = asked_model.result()
        except TrackingError as exc:
            errors["mlflow"] = str(exc)
    tags = model["tags"] if model else {}

    events = read_enrolments(consortium.enrolment_log)
    active = enrolled_sites(events)
    revoked = {e.site: e for e in events if e.event == "revoke" and e.site not in active}
    tagged = {key.split(".", 1)[1] for key in tags if key.startswith("epsilon.")}
    sites = []
    for name in sorted(set(active) | set(revoked) | tagged):
        event = active.get(name) or revoked.get(name)
        node = nodes.get(event.node_id) if event else None
        sites.append(
            {
                "site": name,
                "enrolment": "enrolled"
                if name in active
                else ("revoked" if name in revoked else "not enrolled"),
                # None: the SuperLink was not reached, or does not know the node.
                "node_status": str(node["status"]) if node else None,
                "node_id": event.node_id if event else None,
                "fingerprint": event.fingerprint if event else None,
                "since": event.at.isoformat() if event else None,
                **site_privacy(tags, name),
            }
        )
    known = {e.node_id for e in events}
    strangers = [
        {"node_id": node_id, "status": str(n["status"])}
        for node_id, n in sorted(nodes.items())
        if node_id not in known
    ]

    run_rows = []
    for run in sorted(runs, key=lambda r: int(r["run-id"])):
        run_id = int(run["run-id"])
        launch = launches.get(run_id)
        recorded = last_round(launch.out_dir) if launch else None
        run_rows.append(
            {
                "run_id": run_id,
                "status": str(run["status"]),
                "campaign": launch.campaign if launch else None,
                "rounds": launch.run_config.get("num-server-rounds") if launch else None,
                "last_round": recorded["round"] if recorded else None,
                "last_round_version": recorded.get("model_version") if recorded else None,
                "out_dir": str(launch.out_dir) if launch else None,
                "started_at": launch.at.isoformat() if launch else None,
                # Each site's state in the round in progress (or the last), from the ServerApp.
                "round_states": read_site_states(launch.out_dir) if launch else None,
            }
        )
    return {
        "consortium": str(consortium.dir),
        "superlink": consortium.address,
        "sites": sites,
        "unknown_nodes": strangers,
        "runs": run_rows,
        "model": None
        if model is None
        else {
            "name": model["name"],
            "version": model["version"],
            "created_at": model["created_at"],
            "campaign": tags.get("campaign"),
            "round": tags.get("round"),
            "sites": tags.get("sites"),
        },
        "errors": errors,
    }
