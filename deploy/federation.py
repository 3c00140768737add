"""The consortium lead's federation: enrol sites, run the SuperLink, start and watch runs.

Everything lives in one consortium folder, made by ``init_consortium``
(``busfed federation init --dir D``):

=======================  ==============================================================
``consortium.toml``      the consortium's settings, read as a ``Consortium``
``pki/``                 ``ca.crt``, ``ca.key`` (move it offline), ``server.crt``/``.key``
``flwr/config.toml``     the ``flwr`` CLI's connection profile (``FLWR_HOME``)
``superlink.db``         the SuperLink's state: runs and enrolled nodes
``enrolments.jsonl``     append-only: every enrolment and revocation, with key fingerprints
``launches.jsonl``       append-only: every run started, its campaign and out-dir
``runs/<campaign>/``     the ServerApp's out-dir (``rounds.jsonl``, ``summary.json``)
``mlflow.db``            MLflow, with ``mlartifacts/``, unless another tracking URI is set
=======================  ==============================================================

Flower's own CLI does the talking (``flwr supernode register|unregister|list``, ``flwr
run|list|stop``); this module adds what Flower does not keep: which site holds which node
and key, and which run belongs to which campaign and out-dir.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import time
import tomllib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import (
    ConfigError,
    FederationError,
    TrackingError,
    UsageError,
    validation_problems,
)
from deploy.launcher import (
    APP_DIR,
    PROFILE,
    FlowerCli,
    flower_env,
    spawn,
    stop_processes,
    superlink_argv,
    toml_value,
    write_profile,
)
from deploy.pki import ConsortiumPKI, create_consortium_pki, pki_paths

CONSORTIUM_FILE = "consortium.toml"
ENROLMENT_LOG = "enrolments.jsonl"
LAUNCH_LOG = "launches.jsonl"
DEFAULT_PORT = 9092
# "" lets the ServerApp name it after the model it trains (busfed-wauve, busfed-keyframe2d).
DEFAULT_REGISTERED_MODEL = ""
DEFAULT_MODEL = "wauve"
# Site and campaign names become file and folder names: the same rule as `busfed site init`.
NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
HOST_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
CERT_WARN_DAYS = 30
# SuperNode statuses in `flwr supernode list`; "unregistered" is a revoked node.
REVOKED = "unregistered"


# ------------------------------------------------------------------ the consortium file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SuperLinkSection(_Section):
    hosts: list[str] = Field(min_length=1)
    listen: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    database: Path

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _is_host(host):
                raise ValueError(f"{host!r} is neither an IP address nor a DNS name")
        return hosts

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        if not _is_host(listen):
            raise ValueError(f"{listen!r} is neither an IP address nor a DNS name")
        return listen


class PkiSection(_Section):
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


class TrackingSection(_Section):
    mlflow_tracking_uri: str = Field(min_length=1)
    mlflow_artifact_location: str = ""
    registered_model: str = Field(pattern=r"^([A-Za-z0-9._-]+)?$")
    out_dir: Path


class ConsortiumFile(_Section):
    """The schema of ``consortium.toml``; relative paths are relative to its folder."""

    name: str = Field(min_length=1, pattern=NAME_PATTERN)
    superlink: SuperLinkSection
    pki: PkiSection
    tracking: TrackingSection


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return re.match(HOST_PATTERN, host) is not None and len(host) <= 253
    return True


def render_consortium_file(settings: ConsortiumFile) -> str:
    """``consortium.toml`` with a comment on every setting."""
    q = toml_value
    s, p, t = settings.superlink, settings.pki, settings.tracking
    return (
        "# The busfed consortium, written by `busfed federation init`.\n"
        "# Relative paths are relative to this file's folder.\n"
        f"name = {q(settings.name)}\n"
        "\n[superlink]\n"
        "# Names and addresses sites dial: each is a SAN of the SuperLink certificate; the\n"
        "# first is the address of the lead's flwr connection profile (flwr/config.toml).\n"
        f"hosts = [{', '.join(q(h) for h in s.hosts)}]\n"
        "# The interface the SuperLink listens on (0.0.0.0: all of them).\n"
        f"listen = {q(s.listen)}\n"
        f"port = {s.port}\n"
        "# Runs and enrolled nodes survive a restart in this SQLite file.\n"
        f"database = {q(s.database)}\n"
        "\n[pki]\n"
        f"ca_cert = {q(p.ca_cert)}\n"
        "# The CA's private key: keep it offline; `renew-cert --ca-key` reads it from there.\n"
        f"ca_key = {q(p.ca_key)}\n"
        f"server_cert = {q(p.server_cert)}\n"
        f"server_key = {q(p.server_key)}\n"
        "\n[tracking]\n"
        "# Where the ServerApp records metrics and registers a model version per round.\n"
        f"mlflow_tracking_uri = {q(t.mlflow_tracking_uri)}\n"
        '# "" lets the tracking server choose.\n'
        f"mlflow_artifact_location = {q(t.mlflow_artifact_location)}\n"
        '# "" names it after the model trained: busfed-wauve, busfed-keyframe2d.\n'
        f"registered_model = {q(t.registered_model)}\n"
        "# The ServerApp's out-dir (rounds.jsonl, summary.json): one folder per campaign.\n"
        f"out_dir = {q(t.out_dir)}\n"
    )


@dataclass(frozen=True)
class Consortium:
    """A consortium folder's settings, every path absolute."""

    dir: Path
    name: str
    hosts: tuple[str, ...]
    listen: str
    port: int
    database: Path
    pki: ConsortiumPKI
    mlflow_tracking_uri: str
    mlflow_artifact_location: str
    registered_model: str
    out_dir: Path

    @classmethod
    def load(cls, directory: Path) -> Consortium:
        """Read ``directory/consortium.toml``.

        Raises
        ------
        ConfigError
            Naming the file and each bad field, or saying the folder holds no consortium.
        """
        directory = directory.expanduser().resolve()
        path = directory / CONSORTIUM_FILE
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{path}: no consortium here; create one with "
                f"`busfed federation init --dir {directory} --host HOST`"
            ) from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not readable TOML: {exc}") from exc
        try:
            settings = ConsortiumFile.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(validation_problems(exc, whole="file"))
            raise ConfigError(f"{path}: {problems}") from exc

        def at(p: Path) -> Path:
            return p if p.is_absolute() else directory / p

        t = settings.tracking
        artifacts = t.mlflow_artifact_location
        if artifacts and "://" not in artifacts and not Path(artifacts).is_absolute():
            artifacts = str(directory / artifacts)
        return cls(
            dir=directory,
            name=settings.name,
            hosts=tuple(settings.superlink.hosts),
            listen=settings.superlink.listen,
            port=settings.superlink.port,
            database=at(settings.superlink.database),
            pki=ConsortiumPKI(
                ca_cert=at(settings.pki.ca_cert),
                ca_key=at(settings.pki.ca_key),
                server_cert=at(settings.pki.server_cert),
                server_key=at(settings.pki.server_key),
            ),
            mlflow_tracking_uri=t.mlflow_tracking_uri,
            mlflow_artifact_location=artifacts,
            registered_model=t.registered_model,
            out_dir=at(t.out_dir),
        )

    @property
    def address(self) -> str:
        """``HOST:PORT`` that sites and the lead's flwr CLI dial."""
        host = self.hosts[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.dir / "flwr"

    @property
    def enrolment_log(self) -> Path:
        return self.dir / ENROLMENT_LOG

    @property
    def launch_log(self) -> Path:
        return self.dir / LAUNCH_LOG

    def cli(self) -> FlowerCli:
        """The flwr CLI with this consortium's connection profile.

        The profile is derived from consortium.toml and rewritten when it differs, so a
        moved folder or an edited address still works.
        """
        try:
            write_profile(self.flwr_home, address=self.address, ca_cert=self.pki.ca_cert)
        except OSError as exc:
            raise ConfigError(f"{self.flwr_home}: cannot write the flwr profile: {exc}") from exc
        return FlowerCli(self.flwr_home, self.dir, PROFILE)

    def registered_model_for(self, model: str) -> str:
        """The registered model a run training ``model`` registers its versions under."""
        return self.registered_model or f"busfed-{model}"


def init_consortium(
    directory: Path,
    *,
    hosts: list[str],
    port: int = DEFAULT_PORT,
    listen: str = "0.0.0.0",
    mlflow_tracking_uri: str | None = None,
    mlflow_artifact_location: str | None = None,
    registered_model: str = DEFAULT_REGISTERED_MODEL,
    name: str = "busfed",
) -> Consortium:
    """Create a consortium in ``directory``: CA, SuperLink certificate, settings, profile.

    Parameters
    ----------
    hosts
        Names and addresses sites dial; SANs of the SuperLink certificate. The first one
        is what the lead's flwr CLI dials.
    mlflow_tracking_uri
        Default: ``sqlite:///<directory>/mlflow.db`` with artifacts in
        ``<directory>/mlartifacts``.

    Raises
    ------
    UsageError
        If any file a consortium holds exists already (a replaced CA would cut every
        site off), or a setting is invalid; nothing is written then.
    """
    directory = directory.expanduser().resolve()
    pki = pki_paths(directory / "pki")
    taken = [
        directory / CONSORTIUM_FILE,
        pki.ca_cert,
        pki.ca_key,
        pki.server_cert,
        pki.server_key,
        directory / "flwr" / "config.toml",
        directory / "superlink.db",
        directory / ENROLMENT_LOG,
    ]
    if existing := [str(path) for path in taken if path.exists()]:
        raise UsageError(
            f"{directory} already holds a consortium; refusing to overwrite "
            f"{', '.join(existing)} (a new CA would cut every enrolled site off)"
        )
    if mlflow_tracking_uri is None:
        mlflow_tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
        if mlflow_artifact_location is None:
            mlflow_artifact_location = "mlartifacts"
    raw = {
        "name": name,
        "superlink": {
            "hosts": hosts,
            "listen": listen,
            "port": port,
            "database": "superlink.db",
        },
        "pki": {key: str(path.relative_to(directory)) for key, path in asdict(pki).items()},
        "tracking": {
            "mlflow_tracking_uri": mlflow_tracking_uri,
            "mlflow_artifact_location": mlflow_artifact_location or "",
            "registered_model": registered_model,
            "out_dir": "runs",
        },
    }
    try:
        settings = ConsortiumFile.model_validate(raw)
    except ValidationError as exc:
        options = {
            "hosts": "--host",
            "listen": "--listen",
            "port": "--port",
            "mlflow_tracking_uri": "--mlflow-tracking-uri",
            "registered_model": "--registered-model",
            "name": "--name",
        }
        problems = validation_problems(
            exc, name=lambda loc: options.get(str(loc[-1]), ".".join(map(str, loc)))
        )
        raise UsageError("invalid consortium settings:\n" + "\n".join(problems)) from exc
    directory.mkdir(parents=True, exist_ok=True)
    create_consortium_pki(directory / "pki", hosts=hosts, consortium=name)
    with (directory / CONSORTIUM_FILE).open("x") as f:
        f.write(render_consortium_file(settings))
    consortium = Consortium.load(directory)
    consortium.cli()  # writes the connection profile
    return consortium


# ------------------------------------------------------------------ the SuperLink


def certificate_days_left(path: Path, *, now: dt.datetime | None = None) -> int:
    """Whole days until the PEM certificate at ``path`` expires (negative: expired)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: certificate not found") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a PEM certificate: {exc}") from exc
    return (cert.not_valid_after_utc - (now or dt.datetime.now(dt.UTC))).days


def serve_superlink(consortium: Consortium, *, announce: Any = print) -> None:
    """Run the consortium's SuperLink in the foreground until it exits or we are stopped.

    TLS with the consortium's certificate, SuperNode authentication, state in the
    consortium's database, no package installs at run time. Ctrl-C or SIGTERM (raised as
    KeyboardInterrupt by ``busfed``) stops it and every process it started.

    Raises
    ------
    ConfigError
        A certificate or key is missing, or the SuperLink certificate has expired.
    FederationError
        The SuperLink exited by itself.
    """
    pki = consortium.pki
    missing = [str(p) for p in (pki.ca_cert, pki.server_cert, pki.server_key) if not p.is_file()]
    if missing:
        raise ConfigError(f"the SuperLink needs {', '.join(missing)}")
    days = certificate_days_left(pki.server_cert)
    if days < 0:
        raise ConfigError(
            f"{pki.server_cert}: expired; renew it with "
            f"`busfed federation renew-cert --dir {consortium.dir}`"
        )
    if days < CERT_WARN_DAYS:
        announce(
            f"warning: {pki.server_cert} expires in {days} days; renew it with "
            f"`busfed federation renew-cert --dir {consortium.dir}`"
        )
    argv = superlink_argv(
        pki, host=consortium.listen, port=consortium.port, database=consortium.database
    )
    announce(
        f"SuperLink of {consortium.name} on {consortium.listen}:{consortium.port} "
        f"(sites dial {consortium.address}); state in {consortium.database}"
    )
    proc = spawn(
        "superlink", argv, env=flower_env(consortium.flwr_home), cwd=consortium.dir, log=None
    )
    try:
        code = proc.popen.wait()
    finally:
        stop_processes([proc])
    if code != 0:
        raise FederationError(f"flower-superlink exited with code {code} (its log is above)")


# ------------------------------------------------------------------ enrolment


class EnrolmentEvent(BaseModel):
    """One line of the enrolment log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: Literal["enrol", "revoke"]
    site: str = Field(pattern=NAME_PATTERN)
    node_id: int
    fingerprint: str
    at: dt.datetime
    public_key: str = ""
    reason: str = ""


_Line = TypeVar("_Line", bound=BaseModel)


def read_enrolments(path: Path) -> list[EnrolmentEvent]:
    """Every event in the enrolment log, oldest first ([] if there is none yet)."""
    return read_jsonl(path, EnrolmentEvent)


def read_jsonl(path: Path, model: type[_Line]) -> list[_Line]:
    """An append-only JSON-lines log, validated line by line ([] if it does not exist).

    Raises
    ------
    ConfigError
        Naming the file, the 1-based line and the field of the first bad line.
    """
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as exc:
            problem = "; ".join(validation_problems(exc, whole="line"))
            raise ConfigError(f"{path}, line {number}: {problem}") from exc
    return records


def enrolled_sites(events: list[EnrolmentEvent]) -> dict[str, EnrolmentEvent]:
    """Each site's current enrolment: its latest ``enrol`` not revoked since."""
    active: dict[str, EnrolmentEvent] = {}
    for event in events:
        if event.event == "enrol":
            active[event.site] = event
        elif event.site in active and active[event.site].node_id == event.node_id:
            del active[event.site]
    return active


def _append(path: Path, line: str) -> None:
    """Append one line and make it durable: the logs are the lead's only record."""
    with path.open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def node_public_key(path: Path) -> tuple[str, str]:
    """Read a site's SuperNode public key; return ``(OpenSSH line, SHA256 fingerprint)``.

    The fingerprint is what ``ssh-keygen -lf PATH`` prints, so the lead and the site can
    compare it over the phone.

    Raises
    ------
    UsageError
        Naming the file: missing, a private key, not an OpenSSH public key, or not ECDSA
        P-384 (what ``busfed site init`` makes and Flower's node authentication expects).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: public key file not found") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the public key: {exc.strerror or exc}") from exc
    if b"PRIVATE KEY" in data:
        raise UsageError(
            f"{path}: this is a PRIVATE key, which must never leave the site; ask the site "
            "for its .pub file (and for a new key pair, since this one was shared)"
        )
    expected = "expected one line 'ecdsa-sha2-nistp384 AAAA... SITE' as `busfed site init` writes"
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{path}: not an OpenSSH public key ({exc}); {expected}") from exc
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        kind = line.split()[0].decode()
        raise UsageError(
            f"{path}: an {kind} key, but sites are enrolled with ECDSA P-384 keys only; {expected}"
        )
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return line.decode(), f"SHA256:{digest}"


def _check_site_name(site: str) -> None:
    if not re.match(NAME_PATTERN, site):
        raise UsageError(f"SITE {site!r}: use letters, digits, '.', '_' and '-' only")


def enrol_site(
    consortium: Consortium,
    site: str,
    public_key: Path,
    *,
    replace: bool = False,
    now: dt.datetime | None = None,
) -> list[EnrolmentEvent]:
    """Register a site's SuperNode key with the running SuperLink and log it.

    With ``replace`` a site that is enrolled already gets the new key, then its old node
    is unregistered (key rotation: the site restarts its SuperNode with the new key).

    Returns the events appended to the enrolment log.

    Raises
    ------
    UsageError
        A bad SITE or key file (named), the site enrolled already (without ``replace``),
        or the key enrolled already.
    FederationError
        The SuperLink is unreachable or refused the key.
    """
    _check_site_name(site)
    line, fingerprint = node_public_key(public_key)
    active = enrolled_sites(read_enrolments(consortium.enrolment_log))
    for other, event in active.items():
        if event.fingerprint == fingerprint:
            raise UsageError(f"{public_key}: this key ({fingerprint}) is enrolled for {other}")
    previous = active.get(site)
    if previous is not None and not replace:
        raise UsageError(
            f"{site} is enrolled already (node {previous.node_id}, key {previous.fingerprint}); "
            "pass --replace to enrol its new key, or revoke it first"
        )
    cli = consortium.cli()
    # flwr runs in the consortium folder: a relative path would name another file there.
    node_id = cli.register(public_key.resolve(), name=site)
    now = now or dt.datetime.now(dt.UTC)
    events = [
        EnrolmentEvent(
            event="enrol",
            site=site,
            node_id=node_id,
            fingerprint=fingerprint,
            at=now,
            public_key=line,
        )
    ]
    _append(consortium.enrolment_log, events[0].model_dump_json())
    if previous is not None:
        events.append(
            _unregister(consortium, cli, previous, reason=f"key replaced by {fingerprint}", now=now)
        )
    return events


def revoke_site(
    consortium: Consortium, site: str, *, reason: str = "", now: dt.datetime | None = None
) -> EnrolmentEvent:
    """Unregister a site's node: it is disconnected now and refused when it reconnects.

    Raises
    ------
    UsageError
        The site is not enrolled (the enrolled ones are named).
    FederationError
        The SuperLink is unreachable or does not know the site's node.
    """
    _check_site_name(site)
    active = enrolled_sites(read_enrolments(consortium.enrolment_log))
    if site not in active:
        enrolled = ", ".join(sorted(active)) or "none"
        raise UsageError(f"{site} is not enrolled in {consortium.dir} (enrolled: {enrolled})")
    return _unregister(consortium, consortium.cli(), active[site], reason=reason, now=now)


def _unregister(
    consortium: Consortium,
    cli: FlowerCli,
    enrolment: EnrolmentEvent,
    *,
    reason: str,
    now: dt.datetime | None,
) -> EnrolmentEvent:
    # flwr's node list carries no site names: the node id comes from the enrolment log,
    # and the list confirms the SuperLink knows it.
    nodes = {int(node["node-id"]): node for node in cli.nodes()}
    node = nodes.get(enrolment.node_id)
    if node is None:
        raise FederationError(
            f"the SuperLink at {consortium.address} does not know node {enrolment.node_id} "
            f"of {enrolment.site} (was {consortium.database} replaced?); nothing was revoked"
        )
    if node["status"] != REVOKED:
        cli.unregister(enrolment.node_id)
    event = EnrolmentEvent(
        event="revoke",
        site=enrolment.site,
        node_id=enrolment.node_id,
        fingerprint=enrolment.fingerprint,
        at=now or dt.datetime.now(dt.UTC),
        reason=reason,
    )
    _append(consortium.enrolment_log, event.model_dump_json())
    return event


# ------------------------------------------------------------------ runs


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


def start_run(
    consortium: Consortium,
    *,
    rounds: int,
    preset: str | None = None,
    local_steps: int | None = None,
    learning_rate: float | None = None,
    min_sites: int | None = None,
    proposed_noise_multiplier: float | None = None,
    proposed_sample_rate: float | None = None,
    campaign: str | None = None,
    resume: bool = False,
    model: str | None = None,
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
    run_config = run_config_for(
        consortium,
        rounds=rounds,
        out_dir=out_dir,
        app_config=app_run_config(app_dir),
        preset=preset,
        local_steps=local_steps,
        learning_rate=learning_rate,
        min_sites=min_sites,
        proposed_noise_multiplier=proposed_noise_multiplier,
        proposed_sample_rate=proposed_sample_rate,
        campaign=campaign,
        resume=True if resume else None,
        model=model,
    )
    run_id = consortium.cli().submit(app_dir, run_config)
    record = LaunchRecord(
        run_id=run_id, campaign=campaign or "", out_dir=out_dir, at=now, run_config=run_config
    )
    _append(consortium.launch_log, record.model_dump_json())
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


# ------------------------------------------------------------------ status


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
