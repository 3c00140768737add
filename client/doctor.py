"""``busfed site doctor``: is this site ready to join a federated round?

Each check returns ``pass``, ``warn``, ``fail`` or ``not checked``, what it found and, when
it is not a pass, how to fix it. Warnings never fail the command; one failure does.

Checks, in order: Python and the pinned packages, GPU, free disk at the state folder,
the dataset, the site's keys, the consortium CA certificate, the SuperLink over TLS,
enrolment, and the privacy budget left. Enrolment is reported as ``not checked``: Flower
1.41 has no read-only way for a SuperNode to ask whether its key is registered, and a
trial ``flower-supernode`` would register a live node to which the SuperLink could hand
a running round's work. The lead can tell with ``busfed federation status``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

from common.config import SiteConfig, load_site_config
from common.data.manifest import load_site
from common.errors import BusfedError
from common.keys import load_signing_key, load_verify_key, signing_key_paths

Status = Literal["pass", "warn", "fail", "not checked"]

DISTRIBUTION = "busfed"
KEY_PACKAGES = ("torch", "torchvision", "flwr", "opacus", "dp-accounting", "av", "cryptography")
WARN_FREE_BYTES = 5 * 10**9
FAIL_FREE_BYTES = 1 * 10**9
CERT_WARN_DAYS = 30
BUDGET_WARN_FRACTION = 0.2
TLS_TIMEOUT_S = 5.0
CA_FILE = "ca.crt"  # the consortium's CA, in the site's keys folder unless --ca says


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``fix`` says what to do when ``status`` is not ``pass``."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def exit_code(checks: list[Check]) -> int:
    """0 when nothing failed (warnings allowed), 1 otherwise."""
    return 1 if any(check.status == "fail" for check in checks) else 0


def run_checks(
    config_path: Path,
    *,
    superlink: str | None = None,
    ca: Path | None = None,
    now: dt.datetime | None = None,
) -> list[Check]:
    """Run every check for the site configured in ``config_path``.

    Parameters
    ----------
    config_path : Path
        The site's ``site.toml``.
    superlink : str, optional
        ``HOST:PORT`` of the consortium's SuperLink; without it the TLS check is skipped.
    ca : Path, optional
        The consortium CA certificate (PEM); default ``<keys>/ca.crt`` of the config.
    now : datetime, optional
        The time certificates are checked at (UTC); default: now.
    """
    now = now or dt.datetime.now(dt.UTC)
    checks = [check_python(), check_packages()]
    try:
        config = load_site_config(config_path)
    except BusfedError as error:
        checks.append(Check("config", "fail", str(error), "fix the fields named above"))
        return checks + [
            Check(name, "not checked", "needs a valid site config")
            for name in ("gpu", "disk", "dataset", "keys", "ca", "superlink", "budget")
        ]
    ca_path = ca or config.site.keys / CA_FILE
    site_checks: list[Callable[[], Check]] = [
        lambda: check_gpu(config.site.device),
        lambda: check_disk(config.site.state),
        lambda: check_dataset(config.site.data),
        lambda: check_keys(config.site.keys, site=config.site.name),
        lambda: check_ca(ca_path, now=now),
        lambda: check_superlink(superlink, ca_path, now=now),
        check_enrolment,
        lambda: check_budget(config),
    ]
    return checks + [check() for check in site_checks]


# ------------------------------------------------------------------ software


def _pins() -> list[Requirement]:
    """busfed's runtime requirements, as installed (extras such as ``dev`` left out)."""
    pins = []
    for text in metadata.requires(DISTRIBUTION) or []:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            pins.append(requirement)
    return pins


def check_python() -> Check:
    running = ".".join(map(str, sys.version_info[:3]))
    try:
        wanted = metadata.metadata(DISTRIBUTION)["Requires-Python"] or ""
    except metadata.PackageNotFoundError:
        return Check(
            "python",
            "warn",
            f"Python {running}; busfed is not installed as a package, so its pins are unknown",
            "install it: pip install .",
        )
    if running in SpecifierSet(wanted):
        return Check("python", "pass", f"Python {running} ({wanted})")
    return Check("python", "fail", f"Python {running}, busfed needs {wanted}", "use Python 3.11")


def check_packages() -> Check:
    try:
        pins = _pins()
    except metadata.PackageNotFoundError:
        return Check("packages", "warn", "busfed is not installed as a package", "pip install .")
    missing, different, versions = [], [], {}
    for pin in pins:
        try:
            installed = metadata.version(pin.name)
        except metadata.PackageNotFoundError:
            missing.append(pin.name)
            continue
        versions[pin.name] = installed
        if not pin.specifier.contains(installed, prereleases=True):
            different.append(f"{pin.name} {installed} (pinned {pin.specifier})")
    shown = ", ".join(f"{name} {versions[name]}" for name in KEY_PACKAGES if name in versions)
    fix = "reinstall with the pins, in one command: pip install ."
    if missing:
        return Check("packages", "fail", f"not installed: {', '.join(missing)}", fix)
    if different:
        return Check("packages", "warn", "not the pinned version: " + "; ".join(different), fix)
    return Check("packages", "pass", f"{len(pins)} pins met: {shown}")


def check_gpu(device: str) -> Check:
    import torch  # late: a second or two to import, and only this check needs it

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("gpu", "pass", f"CUDA {torch.version.cuda}: {', '.join(names)}")
    if device.startswith("cuda"):
        return Check(
            "gpu",
            "fail",
            f"site.toml asks for device {device!r}, but torch sees no CUDA GPU",
            'install the NVIDIA driver (nvidia-smi must work), or set device = "auto"',
        )
    return Check(
        "gpu",
        "warn",
        "no CUDA GPU visible: training runs on the CPU (slow with the full-size models)",
        "fine for small presets; for full size, install the NVIDIA driver",
    )


def check_disk(state: Path) -> Check:
    where = state
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = f"{free / 1e9:.1f} GB free at {where}"
    fix = f"free space on the disk of {state} (the ledger and accountant must always fit)"
    if free < FAIL_FREE_BYTES:
        return Check("disk", "fail", detail + f" (< {FAIL_FREE_BYTES / 1e9:g} GB)", fix)
    if free < WARN_FREE_BYTES:
        return Check("disk", "warn", detail + f" (< {WARN_FREE_BYTES / 1e9:g} GB)", fix)
    return Check("disk", "pass", detail)


def check_dataset(data: Path) -> Check:
    try:
        site = load_site(data)
    except BusfedError as error:
        return Check(
            "dataset", "fail", str(error), "run `busfed site ingest` to build the site dataset"
        )
    fix = f"busfed site validate {data}  (lists each bad row)"
    if not site.rows:
        return Check("dataset", "fail", f"{data}: no usable row", fix)
    patients = len(site.patients())
    detail = f"{len(site.rows)} videos of {patients} patients"
    if site.problems:
        return Check(
            "dataset", "warn", f"{detail}; {len(site.problems)} problems (rows skipped)", fix
        )
    return Check("dataset", "pass", detail)


# ------------------------------------------------------------------ keys and certificates


def _private_key_problem(path: Path) -> str | None:
    """Why a private key file is unsafe or unreadable, or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{path}: missing"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path}: mode {stat.filemode(mode)}, readable beyond its owner"
    if not os.access(path, os.R_OK):
        return f"{path}: not readable by this user (uid {os.getuid()})"
    return None


def _key_pair_problem(
    node_key: Path, node_pub: Path, ledger_key: Path, ledger_pub: Path
) -> str | None:
    """Why the key files do not form the site's two key pairs, or None."""
    try:
        node = serialization.load_ssh_private_key(node_key.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        return f"{node_key}: not an OpenSSH private key ({error})"
    if not isinstance(node, ec.EllipticCurvePrivateKey) or node.curve.name != "secp384r1":
        return f"{node_key}: not an ECDSA P-384 key"
    public = node.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if node_pub.read_bytes().split()[:2] != public.split()[:2]:
        return f"{node_pub}: not the public half of {node_key}"
    try:
        signing, verify = load_signing_key(ledger_key), load_verify_key(ledger_pub)
    except BusfedError as error:
        return str(error)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if signing.public_key().public_bytes(*raw) != verify.public_bytes(*raw):
        return f"{ledger_pub}: not the public half of {ledger_key}"
    return None


def check_keys(keys: Path, *, site: str) -> Check:
    node_key, node_pub = keys / f"{site}.key", keys / f"{site}.pub"
    ledger_key, ledger_pub = signing_key_paths(keys, site=site)
    problems = [p for p in map(_private_key_problem, (node_key, ledger_key)) if p]
    problems += [f"{p}: missing" for p in (node_pub, ledger_pub) if not p.is_file()]
    if problems:
        unsafe = [
            str(p)
            for p in (node_key, ledger_key)
            if p.exists() and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        ]
        fix = f"chmod 600 {' '.join(unsafe)}" if unsafe else "restore the keys from the backup"
        return Check("keys", "fail", "; ".join(problems), fix)
    problem = _key_pair_problem(node_key, node_pub, ledger_key, ledger_pub)
    if problem:
        return Check(
            "keys",
            "fail",
            problem,
            "restore the site's keys from its backup (a new node key needs a new enrolment)",
        )
    return Check("keys", "pass", f"{keys}: node key (ECDSA P-384) and ledger key, mode 0600")


def _expiry(cert: x509.Certificate, what: str, now: dt.datetime) -> tuple[Status, str]:
    """Whether ``cert`` is valid at ``now`` and for how long, in words."""
    end, start = cert.not_valid_after_utc, cert.not_valid_before_utc
    subject = cert.subject.rfc4514_string()
    if now < start:
        return "fail", f"{what} {subject} is not valid before {start:%Y-%m-%d %H:%M} UTC"
    if now >= end:
        return "fail", f"{what} {subject} expired on {end:%Y-%m-%d} UTC"
    days = (end - now).days
    status: Status = "warn" if days < CERT_WARN_DAYS else "pass"
    return status, f"{what} {subject} valid until {end:%Y-%m-%d} ({days} days)"


def check_ca(ca: Path, *, now: dt.datetime) -> Check:
    fix = (
        f"ask the consortium lead for the current CA certificate and save it as {ca} (or pass --ca)"
    )
    try:
        certs = x509.load_pem_x509_certificates(ca.read_bytes())
    except FileNotFoundError:
        return Check("ca", "fail", f"{ca}: no consortium CA certificate", fix)
    except (OSError, ValueError) as error:
        return Check("ca", "fail", f"{ca}: not a PEM certificate: {error}", fix)
    results = [_expiry(cert, "CA", now) for cert in certs]
    statuses = {status for status, _ in results}
    worst: Status = "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"
    detail = "; ".join(text for _, text in results)
    return Check("ca", worst, detail, "" if worst == "pass" else fix)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def check_superlink(address: str | None, ca: Path, *, now: dt.datetime) -> Check:
    if address is None:
        return Check(
            "superlink", "not checked", "no --superlink HOST:PORT given", "pass --superlink"
        )
    try:
        host, port = _split_address(address)
    except ValueError as error:
        return Check("superlink", "fail", str(error), "pass --superlink HOST:PORT")
    if not ca.is_file():
        return Check(
            "superlink",
            "fail",
            f"no CA certificate {ca} to verify {address} with",
            f"save the consortium's CA certificate as {ca}, or pass --ca",
        )
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with (
            socket.create_connection((host, port), timeout=TLS_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der, version = tls.getpeercert(binary_form=True), tls.version()
    except ssl.SSLError as error:
        return Check(
            "superlink",
            "fail",
            f"TLS handshake with {address} failed: {error}",
            f"the SuperLink's certificate must be signed by the CA in {ca} and name {host} "
            "(SAN); ask the consortium lead for the current CA",
        )
    except OSError as error:
        return Check(
            "superlink",
            "fail",
            f"cannot connect to {address}: {error.strerror or error}",
            f"check the address, that the SuperLink runs, and the firewall (outbound TCP {port})",
        )
    if der is None:
        return Check("superlink", "fail", f"{address} sent no certificate")
    status, text = _expiry(x509.load_der_x509_certificate(der), "server certificate", now)
    return Check(
        "superlink",
        status,
        f"{address}: {version}, verified against {ca.name}; {text}",
        "" if status == "pass" else "ask the consortium lead to renew the SuperLink certificate",
    )


def check_enrolment() -> Check:
    return Check(
        "enrolment",
        "not checked",
        "Flower 1.41 cannot tell a SuperNode whether its key is registered without "
        "connecting it as a live node",
        "ask the consortium lead to confirm with `busfed federation status`",
    )


# ------------------------------------------------------------------ privacy


def check_budget(config: SiteConfig) -> Check:
    # Late: the accountant pulls in Opacus and dp-accounting.
    from common.privacy.accountant import ACCOUNTANT_FILE, SiteAccountant

    privacy = config.privacy
    path = config.site.state / ACCOUNTANT_FILE
    budget = privacy.epsilon_budget
    if not path.exists():
        return Check("budget", "pass", f"no privacy spent yet: epsilon 0 of {budget:g}")
    try:
        spent = SiteAccountant.load(path).epsilon(privacy.delta)
    except BusfedError as error:
        return Check(
            "budget",
            "fail",
            str(error),
            f"restore {path} from the state backup; never edit it by hand",
        )
    left = budget - spent
    detail = (
        f"epsilon {spent:.3g} of {budget:g} spent at delta {privacy.delta:g}; "
        f"{max(left, 0.0):.3g} left ({max(left, 0.0) / budget:.0%})"
    )
    if left <= 0:
        return Check(
            "budget",
            "warn",
            detail + ": the site refuses every further round",
            "the site has finished its part; only a governance decision may raise the budget",
        )
    if left < BUDGET_WARN_FRACTION * budget:
        return Check(
            "budget",
            "warn",
            detail,
            "few rounds left: tell the consortium lead before the next run",
        )
    return Check("budget", "pass", detail)
