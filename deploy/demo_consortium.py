"""The demo as a consortium folder: what `busfed federation init`, `enrol` and `start` would
have written, so that the lead's commands (``federation status``, ``log``, ``stop``) work on
the demo. Apart from ``deploy/demo.py``, which keeps to running the demo."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.federation.consortium import ENROLMENT_LOG, LAUNCH_LOG
from deploy.launcher import LocalFederation
from deploy.pki import NodeKeys
from deploy.processes import HOST


def lay_out_consortium(
    out: Path,
    fed: LocalFederation,
    enrolled: dict[int, str],
    configs: list[Path],
    keys_of: Callable[[Path], NodeKeys],
) -> Path:
    """Write ``out/consortium`` as `busfed federation init` and `enrol` would have: the
    lead's commands (``federation status``, ``log``, ``stop``) then work on the demo, while
    it runs and (from its logs and MLflow) after it has stopped."""
    from deploy.federation.consortium import (
        CONSORTIUM_FILE,
        ConsortiumFile,
        PkiSection,
        SuperLinkSection,
        TrackingSection,
        render_consortium_file,
    )
    from deploy.federation.enrolment import EnrolmentEvent, node_public_key
    from deploy.federation.logs import append_line

    folder = out / "consortium"
    folder.mkdir(parents=True, exist_ok=True)
    settings = ConsortiumFile(
        name="demo",
        superlink=SuperLinkSection(
            hosts=[HOST], listen=HOST, port=fed.port, database=fed.workdir / "superlink.db"
        ),
        pki=PkiSection(
            ca_cert=fed.pki.ca_cert, ca_key=fed.pki.ca_key,
            server_cert=fed.pki.server_cert, server_key=fed.pki.server_key,
        ),
        tracking=TrackingSection(
            mlflow_tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
            mlflow_artifact_location=str(out / "mlartifacts"),
            registered_model="",
            out_dir=out,
        ),
    )  # fmt: skip
    (folder / CONSORTIUM_FILE).write_text(render_consortium_file(settings))
    now = dt.datetime.now(dt.UTC)
    by_site = {path.parent.name: path for path in configs}
    for node_id, site in enrolled.items():
        line, fingerprint = node_public_key(keys_of(by_site[site]).public_key)
        event = EnrolmentEvent(
            event="enrol", site=site, node_id=node_id, fingerprint=fingerprint, at=now,
            public_key=line,
        )  # fmt: skip
        append_line(folder / ENROLMENT_LOG, event.model_dump_json())
    return folder


def log_launch(consortium: Path, run_id: int, out: Path, run_config: dict[str, Any]) -> None:
    """Append the demo's run to its consortium folder's launch log."""
    from deploy.federation.logs import append_line
    from deploy.federation.runs import LaunchRecord

    record = LaunchRecord(
        run_id=run_id, campaign="demo", out_dir=out, at=dt.datetime.now(dt.UTC),
        run_config=run_config,
    )  # fmt: skip
    append_line(consortium / LAUNCH_LOG, record.model_dump_json())
