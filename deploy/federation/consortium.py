"""The consortium file: ``consortium.toml``'s schema, the ``Consortium`` it loads, and ``init``.

``init_consortium`` (``busfed federation init``) makes the folder: the CA and SuperLink
certificate, the settings file and the flwr CLI's connection profile. ``Consortium.load``
reads the settings back with every path made absolute; the other modules of
``deploy.federation`` take a ``Consortium``.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError, UsageError, validation_problems
from deploy.flwr_cli import PROFILE, FlowerCli, toml_value, write_profile
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
