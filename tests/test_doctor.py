"""``busfed site doctor``: a good site passes; each broken part fails or warns with its fix."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from client.cli import site_app
from client.doctor import Check, exit_code, run_checks
from common.config import load_site_config, render_site_config
from common.privacy.accountant import ACCOUNTANT_FILE, SiteAccountant
from deploy.pki import ConsortiumPKI, create_consortium_pki
from deploy.synth import generate_site
from tests.tls import tls_server

LOCAL = ("python", "packages", "disk", "dataset", "keys", "ca", "budget")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "site"
    generate_site(out, site="a", patients=3, seed=1, vendor="vendor-a", frames=8, size=64)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ConsortiumPKI:
    return create_consortium_pki(tmp_path_factory.mktemp("pki"), hosts=["127.0.0.1"])


@pytest.fixture
def site(tmp_path: Path, data: Path, pki: ConsortiumPKI) -> Path:
    """A site set up as the runbook says: init, the consortium's CA in keys/."""
    args = [
        "init", str(tmp_path / "site"), "--name", "site-a", "--data", str(data),
        "--epsilon-budget", "8", "--delta", "1e-5", "--noise-multiplier", "1.5",
        "--max-grad-norm", "1", "--sample-rate", "0.3",
    ]  # fmt: skip
    result = CliRunner().invoke(site_app, args)
    assert result.exit_code == 0, result.output
    shutil.copy(pki.ca_cert, tmp_path / "site" / "keys" / "ca.crt")
    return tmp_path / "site" / "site.toml"


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_a_good_site_passes_its_local_checks(site):
    checks = by_name(run_checks(site))
    assert {name: checks[name].status for name in LOCAL} == dict.fromkeys(LOCAL, "pass")
    assert checks["gpu"].status in ("pass", "warn")  # CPU only is a warning, not a failure
    assert checks["superlink"].status == "not checked"
    assert checks["enrolment"].status == "not checked"
    assert "busfed federation status" in checks["enrolment"].fix
    assert exit_code(list(checks.values())) == 0


def test_a_key_readable_by_others_fails_with_the_fix(site):
    key = site.parent / "keys" / "site-a.key"
    key.chmod(0o644)
    checks = run_checks(site)
    keys = by_name(checks)["keys"]
    assert keys.status == "fail" and "readable beyond its owner" in keys.detail
    assert keys.fix == f"chmod 600 {key}"
    assert exit_code(checks) == 1


def test_a_public_key_that_does_not_match_fails(site, tmp_path):
    other = tmp_path / "other"
    CliRunner().invoke(
        site_app,
        ["init", str(other), "--name", "site-a", "--data", str(tmp_path),
         "--epsilon-budget", "1", "--delta", "1e-5", "--noise-multiplier", "1",
         "--max-grad-norm", "1", "--sample-rate", "0.1"],
    )  # fmt: skip
    shutil.copy(other / "keys" / "site-a.pub", site.parent / "keys" / "site-a.pub")
    keys = by_name(run_checks(site))["keys"]
    assert keys.status == "fail" and "not the public half" in keys.detail


def _self_signed(path: Path, *, not_before: dt.datetime, not_after: dt.datetime) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_an_expired_ca_fails_and_one_expiring_soon_warns(site, tmp_path):
    now = dt.datetime.now(dt.UTC)
    expired = _self_signed(
        tmp_path / "expired.crt", not_before=now - dt.timedelta(days=400),
        not_after=now - dt.timedelta(days=1),
    )  # fmt: skip
    soon = _self_signed(
        tmp_path / "soon.crt", not_before=now - dt.timedelta(days=300),
        not_after=now + dt.timedelta(days=10),
    )  # fmt: skip

    ca = by_name(run_checks(site, ca=expired))["ca"]
    assert ca.status == "fail" and "expired on" in ca.detail and ca.fix

    ca = by_name(run_checks(site, ca=soon))["ca"]
    assert ca.status == "warn" and "valid until" in ca.detail and ca.fix

    missing = by_name(run_checks(site, ca=tmp_path / "none.crt"))["ca"]
    assert missing.status == "fail" and "no consortium CA certificate" in missing.detail


def test_superlink_reachable_over_tls_passes(site, pki):
    with tls_server(pki.server_cert, pki.server_key) as address:
        superlink = by_name(run_checks(site, superlink=address))["superlink"]
    assert superlink.status == "pass", superlink
    assert "TLSv1" in superlink.detail and "server certificate" in superlink.detail


def test_superlink_with_another_ca_fails_certificate_verify(site, tmp_path):
    stranger = create_consortium_pki(tmp_path / "stranger", hosts=["127.0.0.1"])
    with tls_server(stranger.server_cert, stranger.server_key) as address:
        checks = run_checks(site, superlink=address)
    superlink = by_name(checks)["superlink"]
    assert superlink.status == "fail"
    assert "CERTIFICATE_VERIFY_FAILED" in superlink.detail
    assert exit_code(checks) == 1


def test_unreachable_superlink_fails(site):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    superlink = by_name(run_checks(site, superlink=f"127.0.0.1:{port}"))["superlink"]
    assert superlink.status == "fail" and "cannot connect" in superlink.detail


def test_budget_nearly_spent_warns(site):
    config = load_site_config(site)
    accountant = SiteAccountant(kind="rdp")
    accountant.record(1.5, 0.3, 40)
    config.site.state.mkdir(parents=True, exist_ok=True)
    accountant.save(config.site.state / ACCOUNTANT_FILE)
    spent = accountant.epsilon(config.privacy.delta)

    tight = config.privacy.model_copy(update={"epsilon_budget": round(spent * 1.1, 3)})
    site.write_text(render_site_config(config.model_copy(update={"privacy": tight})))
    budget = by_name(run_checks(site))["budget"]
    assert budget.status == "warn" and "left" in budget.detail

    loose = config.privacy.model_copy(update={"epsilon_budget": round(spent * 3, 3)})
    site.write_text(render_site_config(config.model_copy(update={"privacy": loose})))
    assert by_name(run_checks(site))["budget"].status == "pass"


def test_a_bad_config_fails_and_skips_what_needs_it(tmp_path):
    (tmp_path / "site.toml").write_text("[site]\nname = 'x'\n")
    checks = by_name(run_checks(tmp_path / "site.toml"))
    assert checks["config"].status == "fail"
    assert checks["keys"].status == checks["budget"].status == "not checked"


def test_cli_json(site, tmp_path):
    result = CliRunner().invoke(site_app, ["doctor", "--config", str(site), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= {*LOCAL, "gpu", "superlink", "enrolment"}
    assert set(report["checks"][0]) == {"name", "status", "detail", "fix"}

    (site.parent / "keys" / "site-a.ledger.key").chmod(0o604)
    result = CliRunner().invoke(site_app, ["doctor", "--config", str(site), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["ok"] is False
