"""``busfed federation ...``: the consortium lead's commands.

Fast tests run the Typer app in-process and start no Flower process. The end-to-end test
runs the venv's ``busfed`` as a subprocess against a real SuperLink and real SuperNodes
on 127.0.0.1: enrol two sites, see them online, revoke one, and see it refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from typer.testing import CliRunner

from client.doctor import check_superlink
from common.errors import ConfigError, UsageError
from common.keys import NodeKeys, create_node_keys
from common.site_states import STATE_FILE
from deploy.federation.cli import federation_app
from deploy.federation.consortium import (
    CONSORTIUM_FILE,
    ENROLMENT_LOG,
    LAUNCH_LOG,
    Consortium,
    init_consortium,
)
from deploy.federation.enrolment import EnrolmentEvent, enrolled_sites, read_enrolments
from deploy.federation.runs import LaunchRecord, app_run_config, run_config_for
from deploy.federation.status import site_privacy
from deploy.launcher import APP_DIR, LocalFederation
from deploy.processes import free_port
from server.site_state import SiteStates
from tests.tls import tls_server

runner = CliRunner()
BUSFED = Path(sys.executable).parent / "busfed"
ENV = {
    **{k: v for k, v in os.environ.items() if k != "BUSFED_CONSORTIUM"},
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "COLUMNS": "200",
    "NO_COLOR": "1",
}


def invoke(*args: str | Path):
    return runner.invoke(federation_app, [str(a) for a in args], env={"COLUMNS": "200"})


def init(directory: Path, *extra: str):
    return invoke("init", "--dir", directory, "--host", "127.0.0.1", "--host", "localhost", *extra)


def files(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def sans(cert: x509.Certificate) -> list[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


# ------------------------------------------------------------------ init


def test_init_writes_ca_certificate_config_and_profile(tmp_path):
    result = init(tmp_path / "c", "--port", "9555")
    assert result.exit_code == 0, result.output

    consortium = Consortium.load(tmp_path / "c")
    pki = consortium.pki
    assert pki.ca_cert == tmp_path / "c" / "pki" / "ca.crt"
    for key in (pki.ca_key, pki.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert sans(server) == ["127.0.0.1", "localhost"]
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=4 * 365)

    assert (consortium.address, consortium.listen, consortium.port) == (
        "127.0.0.1:9555",
        "0.0.0.0",
        9555,
    )
    assert consortium.database == tmp_path / "c" / "superlink.db"
    assert consortium.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}"
    assert consortium.mlflow_artifact_location == str(tmp_path / "c" / "mlartifacts")
    assert consortium.registered_model == ""  # the app names it after the model
    assert consortium.registered_model_for("wauve") == "busfed-wauve"
    profile = (tmp_path / "c" / "flwr" / "config.toml").read_text()
    assert 'address = "127.0.0.1:9555"' in profile and str(pki.ca_cert) in profile
    assert str(pki.ca_key) in result.output  # told to move it offline


def test_init_refuses_an_existing_consortium_and_changes_nothing(tmp_path):
    assert init(tmp_path / "c").exit_code == 0
    before = files(tmp_path / "c")
    again = init(tmp_path / "c", "--port", "9999")
    assert again.exit_code == 2
    assert "already holds a consortium" in again.output and "ca.key" in again.output
    assert files(tmp_path / "c") == before

    # A CA alone (say, restored from a backup) is enough to stop it.
    (tmp_path / "d" / "pki").mkdir(parents=True)
    (tmp_path / "d" / "pki" / "ca.key").write_text("the consortium's CA key")
    assert init(tmp_path / "d").exit_code == 2
    assert [p.name for p in (tmp_path / "d").rglob("*") if p.is_file()] == ["ca.key"]


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--host", "bad host"], "--host"), (["--port", "70000"], "--port"),
     (["--listen", "*"], "--listen"), (["--registered-model", "a b"], "--registered-model")],
)  # fmt: skip
def test_init_bad_settings_name_the_option_and_write_nothing(tmp_path, args, named):
    result = invoke("init", "--dir", tmp_path / "c", "--host", "127.0.0.1", *args)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "c").exists()


def test_a_missing_or_broken_consortium_file_is_named(tmp_path):
    result = invoke("status", "--dir", tmp_path)
    assert result.exit_code == 2 and "busfed federation init" in result.output
    assert init(tmp_path / "c").exit_code == 0
    path = tmp_path / "c" / CONSORTIUM_FILE
    path.write_text(path.read_text().replace("port = 9092", 'port = "ninety"'))
    result = invoke("status", "--dir", tmp_path / "c")
    assert result.exit_code == 2
    assert str(path) in result.output and "superlink.port" in result.output


# ------------------------------------------------------------------ renew-cert


def test_renew_cert_keeps_the_ca_and_backs_up_the_old_certificate(tmp_path):
    assert init(tmp_path / "c").exit_code == 0
    pki = Consortium.load(tmp_path / "c").pki
    ca_before, old_cert, old_key = (
        pki.ca_cert.read_bytes(),
        pki.server_cert.read_bytes(),
        pki.server_key.read_bytes(),
    )

    result = invoke("renew-cert", "--dir", tmp_path / "c", "--days", "30")
    assert result.exit_code == 0, result.output

    assert pki.ca_cert.read_bytes() == ca_before  # sites need nothing new
    ca = x509.load_pem_x509_certificate(ca_before)
    old = x509.load_pem_x509_certificate(old_cert)
    new = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    new.verify_directly_issued_by(ca)
    assert new.serial_number != old.serial_number
    assert sans(new) == sans(old) and new.subject == old.subject
    lifetime = new.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    assert pki.server_key.read_bytes() != old_key
    new_key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert isinstance(new_key, ec.EllipticCurvePrivateKey)
    assert new_key.public_key() == new.public_key()
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600

    backups = sorted(p.name for p in pki.server_cert.parent.glob("server-*"))
    assert len(backups) == 2, backups
    backup_cert = next(pki.server_cert.parent.glob("server-*.crt"))
    backup_key = next(pki.server_cert.parent.glob("server-*.key"))
    assert backup_cert.read_bytes() == old_cert and backup_key.read_bytes() == old_key
    assert stat.S_IMODE(backup_key.stat().st_mode) == 0o600
    assert str(backup_cert) in result.output


def test_renew_cert_with_the_ca_key_offline_or_the_wrong_key(tmp_path):
    assert init(tmp_path / "c").exit_code == 0
    pki = Consortium.load(tmp_path / "c").pki
    offline = tmp_path / "usb" / "ca.key"
    offline.parent.mkdir()
    shutil.move(pki.ca_key, offline)
    cert = pki.server_cert.read_bytes()

    missing = invoke("renew-cert", "--dir", tmp_path / "c")
    assert missing.exit_code == 2 and str(pki.ca_key) in missing.output
    assert "--ca-key" in missing.output

    assert init(tmp_path / "other").exit_code == 0
    stranger = Consortium.load(tmp_path / "other").pki.ca_key
    wrong = invoke("renew-cert", "--dir", tmp_path / "c", "--ca-key", stranger)
    assert wrong.exit_code == 2 and "not the private key of the CA" in wrong.output
    assert pki.server_cert.read_bytes() == cert
    assert not list(pki.server_cert.parent.glob("server-*"))  # no backup of nothing

    assert invoke("renew-cert", "--dir", tmp_path / "c", "--ca-key", offline).exit_code == 0
    assert pki.server_cert.read_bytes() != cert


def test_a_site_trusts_the_renewed_certificate_and_doctor_warns_before_it_expires(tmp_path):
    assert init(tmp_path / "c").exit_code == 0
    pki = Consortium.load(tmp_path / "c").pki
    site_ca = tmp_path / "site-ca.crt"
    shutil.copy(pki.ca_cert, site_ca)  # what the site got at enrolment, unchanged since
    now = dt.datetime.now(dt.UTC)
    with tls_server(pki.server_cert, pki.server_key) as address:
        assert check_superlink(address, site_ca, now=now).status == "pass"

    assert invoke("renew-cert", "--dir", tmp_path / "c", "--days", "10").exit_code == 0
    with tls_server(pki.server_cert, pki.server_key) as address:
        check = check_superlink(address, site_ca, now=now)
    assert check.status == "warn", check
    assert "server certificate" in check.detail and "renew" in check.fix


# ------------------------------------------------------------------ enrol: key checks


def _write_key(path: Path, kind: str) -> Path:
    if kind == "garbage":
        path.write_text("this is not a key\n")
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        path.write_bytes(
            key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    elif kind == "p256":
        key256 = ec.generate_private_key(ec.SECP256R1()).public_key()
        path.write_bytes(
            key256.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    elif kind == "private":
        keys = create_node_keys(path.parent / "made", site="site-a")
        path.write_bytes(keys.private_key.read_bytes())
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [("garbage", "not an OpenSSH public key"), ("ed25519", "ssh-ed25519"),
     ("p256", "ecdsa-sha2-nistp256"), ("private", "PRIVATE key"), ("missing", "not found")],
)  # fmt: skip
def test_enrol_refuses_a_bad_public_key_naming_the_file(tmp_path, kind, says):
    assert init(tmp_path / "c").exit_code == 0
    key = _write_key(tmp_path / f"{kind}.pub", kind)
    # No SuperLink runs: the key is refused before Flower is asked (that would exit 5).
    result = invoke("enrol", "site-a", key, "--dir", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert str(key) in result.output and says in result.output
    assert not (tmp_path / "c" / ENROLMENT_LOG).exists()


def test_enrol_refuses_a_bad_site_name(tmp_path):
    assert init(tmp_path / "c").exit_code == 0
    keys = create_node_keys(tmp_path / "keys", site="site-a")
    result = invoke("enrol", "site a", keys.public_key, "--dir", tmp_path / "c")
    assert result.exit_code == 2 and "SITE 'site a'" in result.output


def test_the_enrolment_log_tracks_enrolments_replacements_and_revocations():
    def event(kind: str, site: str, node: int) -> EnrolmentEvent:
        return EnrolmentEvent(
            event=kind,
            site=site,
            node_id=node,
            fingerprint=f"SHA256:{node}",
            at=dt.datetime.now(dt.UTC),
        )

    events = [
        event("enrol", "a", 1),
        event("enrol", "b", 2),
        event("enrol", "a", 3),  # a's key replaced ...
        event("revoke", "a", 1),  # ... and its old node removed
        event("revoke", "b", 2),
    ]
    assert {site: e.node_id for site, e in enrolled_sites(events).items()} == {"a": 3}


def test_a_corrupt_enrolment_log_line_is_named(tmp_path):
    log = tmp_path / ENROLMENT_LOG
    log.write_text('{"event": "enrol", "site": "a"}\n')
    with pytest.raises(ConfigError, match=r"enrolments.jsonl, line 1: node_id"):
        read_enrolments(log)


# ------------------------------------------------------------------ start, status


def test_start_checks_its_options_before_asking_the_superlink(tmp_path):
    assert init(tmp_path / "c").exit_code == 0
    resume = invoke("start", "--dir", tmp_path / "c", "--rounds", "2", "--resume")
    assert resume.exit_code == 2 and "--resume needs --campaign" in resume.output
    preset = invoke("start", "--dir", tmp_path / "c", "--rounds", "2", "--preset", "huge")
    assert preset.exit_code == 2 and "--preset 'huge'" in preset.output
    name = invoke("start", "--dir", tmp_path / "c", "--rounds", "2", "--campaign", "a/b")
    assert name.exit_code == 2 and "--campaign" in name.output


def test_the_run_config_takes_tracking_from_the_consortium_and_only_given_options(tmp_path):
    consortium = init_consortium(tmp_path / "c", hosts=["127.0.0.1"])
    app_config = {
        k: 0
        for k in ("num-server-rounds", "preset", "local-steps", "campaign", "resume",
                  "mlflow-tracking-uri", "mlflow-artifact-location", "registered-model",
                  "out-dir")
    }  # fmt: skip
    out = tmp_path / "c" / "runs" / "spring"
    config = run_config_for(
        consortium, rounds=5, out_dir=out, app_config=app_config,
        preset="tiny", local_steps=None, campaign="spring", resume=True,
    )  # fmt: skip
    assert config == {
        "num-server-rounds": 5,
        "preset": "tiny",
        "campaign": "spring",
        "resume": True,
        "mlflow-tracking-uri": consortium.mlflow_tracking_uri,
        "mlflow-artifact-location": consortium.mlflow_artifact_location,
        "registered-model": "",
        "out-dir": str(out),
    }
    with pytest.raises(UsageError, match="does not accept --learning-rate"):
        run_config_for(consortium, rounds=1, out_dir=out, app_config=app_config, learning_rate=0.1)


def test_the_app_takes_an_initial_model_and_its_trunk(tmp_path):
    consortium = init_consortium(tmp_path / "c", hosts=["127.0.0.1"])
    app_config = app_run_config(APP_DIR)
    assert (app_config["init-model"], app_config["trunk"]) == ("", "groupnorm")
    config = run_config_for(
        consortium, rounds=2, out_dir=tmp_path / "out", app_config=app_config,
        init_model="models:/busfed-keyframe2d/1", trunk="frozen-bn",
    )  # fmt: skip
    assert (config["init-model"], config["trunk"]) == ("models:/busfed-keyframe2d/1", "frozen-bn")


def test_site_privacy_from_version_tags_shows_unknowns_as_none():
    tags = {"epsilon.a": "1.5", "delta.a": "1e-05", "epsilon_budget.a": "8", "epsilon.b": "2"}
    assert site_privacy(tags, "a") == {
        "epsilon": 1.5,
        "delta": 1e-5,
        "epsilon_budget": 8.0,
        "budget_left": 6.5,
    }
    assert site_privacy(tags, "b") == {
        "epsilon": 2.0,
        "delta": None,
        "epsilon_budget": None,
        "budget_left": None,
    }


def test_status_without_a_superlink_still_shows_the_log_and_mlflow(tmp_path):
    from mlflow import MlflowClient

    consortium = init_consortium(tmp_path / "c", hosts=["127.0.0.1"], port=free_port())
    keys = create_node_keys(tmp_path / "keys", site="hospital-a")
    entry = EnrolmentEvent(
        event="enrol", site="hospital-a", node_id=42, fingerprint="SHA256:x",
        at=dt.datetime.now(dt.UTC), public_key=keys.public_key.read_text().strip(),
    )  # fmt: skip
    (tmp_path / "c" / ENROLMENT_LOG).write_text(entry.model_dump_json() + "\n")
    # A run that was launched and is in its second round: hospital-a has sent its update.
    out_dir = tmp_path / "c" / "runs" / "spring"
    out_dir.mkdir(parents=True)
    (out_dir / "rounds.jsonl").write_text(json.dumps({"round": 1, "model_version": "1"}) + "\n")
    SiteStates(out_dir / STATE_FILE, names={"42": "hospital-a"}).new_round(2, [42])
    launch = LaunchRecord(
        run_id=7, campaign="spring", out_dir=out_dir, at=dt.datetime.now(dt.UTC),
        run_config={"num-server-rounds": 3},
    )  # fmt: skip
    (tmp_path / "c" / LAUNCH_LOG).write_text(launch.model_dump_json() + "\n")
    client = MlflowClient(
        tracking_uri=consortium.mlflow_tracking_uri, registry_uri=consortium.mlflow_tracking_uri
    )
    client.create_registered_model("busfed-wauve")
    for round_, epsilon in ((1, "0.9"), (2, "1.4")):
        client.create_model_version(
            "busfed-wauve", source=str(tmp_path), tags={
                "round": str(round_), "campaign": "spring", "epsilon.hospital-a": epsilon,
                "delta.hospital-a": "1e-05", "epsilon_budget.hospital-a": "8",
                "epsilon.hospital-b": "2.0", "delta.hospital-b": "1e-05",
            },
        )  # fmt: skip

    result = invoke("status", "--dir", tmp_path / "c", "--json")
    assert result.exit_code == 5  # the SuperLink could not be asked ...
    report = json.loads(result.stdout)
    assert "unavailable" in report["errors"]["superlink"]
    assert report["model"]["version"] == "2" and report["model"]["campaign"] == "spring"
    a, b = report["sites"]  # ... but what the lead knows is shown
    assert (a["site"], a["enrolment"], a["node_id"], a["node_status"]) == (
        "hospital-a", "enrolled", 42, None,
    )  # fmt: skip
    assert (a["epsilon"], a["epsilon_budget"], a["budget_left"]) == (1.4, 8.0, 6.6)
    assert (b["site"], b["enrolment"], b["epsilon"], b["epsilon_budget"]) == (
        "hospital-b", "not enrolled", 2.0, None,
    )  # fmt: skip
    (run,) = report["runs"]  # from the launch log and the run's own records
    assert (run["run_id"], run["status"], run["campaign"], run["last_round"]) == (
        7, "? (SuperLink not reached)", "spring", 1,
    )  # fmt: skip
    assert run["round_states"]["round"] == 2
    assert run["round_states"]["sites"]["hospital-a"]["state"] == "waiting"

    table = invoke("status", "--dir", tmp_path / "c")
    assert table.exit_code == 5
    assert "hospital-b" in table.output and "?" in table.output and "version 2" in table.output


# ------------------------------------------------------------------ end to end


def busfed(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUSFED), *map(str, args)],
        env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def status_json(directory: Path) -> dict:
    result = busfed("federation", "status", "--dir", directory, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def node_status(report: dict) -> dict[str, tuple[str, str | None]]:
    return {s["site"]: (s["enrolment"], s["node_status"]) for s in report["sites"]}


SITES = ("hospital-a", "hospital-b")


def start_site_init(directory: Path, site: str) -> subprocess.Popen[str]:
    """``busfed site init`` as the hospital runs it (no data yet: enrolment needs none)."""
    privacy = [
        "--epsilon-budget", "8", "--delta", "1e-5", "--noise-multiplier", "1.1",
        "--max-grad-norm", "1", "--sample-rate", "0.3",
    ]  # fmt: skip
    argv = [str(BUSFED), "site", "init", str(directory), "--name", site, "--data"]
    return subprocess.Popen(
        [*argv, str(directory / "data"), *privacy],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def process_tree(pid: int) -> set[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ssh_fingerprint(public_key: Path) -> str | None:
    if shutil.which("ssh-keygen") is None:
        return None
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True)
    return out.stdout.split()[1]


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_enrol_then_revoke_with_a_real_superlink_and_supernodes(tmp_path):
    consortium_dir = tmp_path / "consortium"
    port = free_port()
    done = busfed(
        "federation", "init", "--dir", consortium_dir, "--host", "127.0.0.1",
        "--listen", "127.0.0.1", "--port", str(port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    consortium = Consortium.load(consortium_dir)

    superlink_log = (tmp_path / "superlink.log").open("wb")
    superlink = subprocess.Popen(
        [str(BUSFED), "federation", "superlink", "--dir", str(consortium_dir)],
        stdout=superlink_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    superlink_log.close()
    tree: set[psutil.Process] = set()
    try:
        # The two hospitals set themselves up while the SuperLink starts.
        inits = {site: start_site_init(tmp_path / site, site) for site in SITES}
        for site, proc in inits.items():
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, f"site init {site}:\n{out}"
        keys = {
            site: NodeKeys(tmp_path / site / "keys" / f"{site}.key",
                           tmp_path / site / "keys" / f"{site}.pub")
            for site in inits
        }  # fmt: skip

        deadline = time.monotonic() + 90
        while True:
            assert superlink.poll() is None, (tmp_path / "superlink.log").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the SuperLink never listened"
            time.sleep(0.3)

        for site, pair in keys.items():
            enrolled = busfed("federation", "enrol", site, pair.public_key, "--dir", consortium_dir)
            assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
            if fingerprint := ssh_fingerprint(pair.public_key):
                assert fingerprint in enrolled.stdout  # what the site reads on the phone
        again = busfed("federation", "enrol", "hospital-a", keys["hospital-a"].public_key,
                       "--dir", consortium_dir)  # fmt: skip
        assert again.returncode == 2 and "enrolled for hospital-a" in again.stderr

        with LocalFederation(tmp_path / "sites", consortium.pki, port=port) as sites:
            for site, pair in keys.items():
                config = {"site-config": str(tmp_path / site / "site.toml")}
                sites.start_supernode(site, pair, node_config=config)

            deadline = time.monotonic() + 120
            while node_status(report := status_json(consortium_dir)) != {
                "hospital-a": ("enrolled", "online"),
                "hospital-b": ("enrolled", "online"),
            }:
                for proc in sites.processes:
                    assert proc.alive(), f"{proc.name} exited:\n{proc.tail()}"
                assert time.monotonic() < deadline, report
                time.sleep(1)
            assert report["errors"] == {} and report["unknown_nodes"] == []

            revoked = busfed("federation", "revoke", "hospital-b", "--dir", consortium_dir,
                             "--reason", "test")  # fmt: skip
            assert revoked.returncode == 0, revoked.stdout + revoked.stderr
            old_b = next(p for p in sites.processes if p.name == "supernode-hospital-b")
            old_b.kill()  # the hospital restarts its SuperNode
            again_b = sites.start_supernode(
                "hospital-b-restarted", keys["hospital-b"],
                node_config={"site-config": str(tmp_path / "hospital-b" / "site.toml")},
            )  # fmt: skip
            assert again_b.popen.wait(timeout=120) != 0
            assert "Failed to activate SuperNode" in again_b.log.read_text()

            report = status_json(consortium_dir)
            assert node_status(report) == {
                "hospital-a": ("enrolled", "online"),
                "hospital-b": ("revoked", "unregistered"),
            }
            assert next(p for p in sites.processes if p.name == "supernode-hospital-a").alive()

        # Key rotation: hospital-a's new key is enrolled, then its old node removed.
        new_a = create_node_keys(tmp_path / "hospital-a" / "new-keys", site="hospital-a")
        rotated = busfed("federation", "enrol", "hospital-a", new_a.public_key, "--replace",
                         "--dir", consortium_dir)  # fmt: skip
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        nodes = {int(n["node-id"]): n["status"] for n in consortium.cli().nodes()}

        events = read_enrolments(consortium_dir / ENROLMENT_LOG)
        assert [(e.event, e.site) for e in events] == [
            ("enrol", "hospital-a"), ("enrol", "hospital-b"), ("revoke", "hospital-b"),
            ("enrol", "hospital-a"), ("revoke", "hospital-a"),
        ]  # fmt: skip
        assert events[2].node_id == events[1].node_id and events[2].reason == "test"
        assert events[4].node_id == events[0].node_id != events[3].node_id
        assert nodes[events[0].node_id] == nodes[events[1].node_id] == "unregistered"
        assert nodes[events[3].node_id] == "registered"  # waits for the site's restart

        # systemd's stop: SIGTERM; busfed stops the SuperLink and everything it started.
        tree |= process_tree(superlink.pid)
        assert len(tree) >= 3  # busfed, flower-superlink, flower-superexec
        superlink.send_signal(signal.SIGTERM)
        assert superlink.wait(timeout=60) == 130, (tmp_path / "superlink.log").read_text()
        time.sleep(1)
        assert [p.pid for p in tree if running(p)] == []
    finally:
        tree |= process_tree(superlink.pid)
        for p in tree:  # after a failure: leave no Flower process behind
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        superlink.wait(timeout=30)
