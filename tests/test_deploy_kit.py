"""The deploy kit holds together: units, compose files and runbooks name real commands and flags."""

from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
RUNBOOKS = sorted((DEPLOY / "runbooks").glob("*.md"))
BIN = Path(sys.executable).parent
VENV_PREFIX = "/opt/busfed/venv/bin/"
# Commands whose flags are read from their --help output (name -> how to ask for help).
HELP_ARGV = {
    "flower-superlink": ["flower-superlink", "--help"],
    "flower-supernode": ["flower-supernode", "--help"],
    # busfed's wrappers print their own options, then Flower's.
    "busfed-superlink": ["busfed-superlink", "--help"],
    "busfed-supernode": ["busfed-supernode", "--help"],
}
ENV = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "200", "NO_COLOR": "1"}


# ------------------------------------------------------------------ parsing helpers


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def exec_start(unit: configparser.ConfigParser) -> list[str]:
    # systemd's line continuations; configparser keeps the indented lines joined by "\n".
    return shlex.split(unit["Service"]["ExecStart"].replace("\\\n", " ").replace("\n", " "))


def command_name(argv: list[str]) -> str:
    """``flower-superlink`` or ``mlflow server``: the key into HELP_ARGV."""
    name = Path(argv[0]).name
    return f"{name} {argv[1]}" if name == "mlflow" else name


def flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


@cache
def help_texts() -> dict[str, str]:
    """Every --help text the checks need, run concurrently (each start costs seconds)."""
    procs = {
        name: subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=ENV,
            text=True,
        )
        for name, argv in HELP_ARGV.items()
    }
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} --help failed:\n{text}"
        out[name] = text
    return out


def known_flags(name: str) -> set[str]:
    if name == "mlflow server":
        # A click command: its options are what `mlflow server --help` prints, read without
        # starting a second interpreter.
        from mlflow.cli import server

        return {o for p in server.params for o in (*p.opts, *p.secondary_opts)}
    assert name in HELP_ARGV, f"unexpected command {name}"
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", help_texts()[name]))


def check_flags_exist(argv: list[str], where: str) -> None:
    if Path(argv[0]).name == "busfed":  # a subcommand path: its options come from the app
        check_cli_command(["busfed", *argv[1:]], where)
        return
    name = command_name(argv)
    known = known_flags(name)
    unknown = [flag for flag in flags(argv) if flag not in known]
    assert not unknown, f"{where}: {name} has no {unknown}"


# ------------------------------------------------------------------ systemd units


def test_units_are_the_three_expected():
    assert [u.name for u in UNITS] == [
        "busfed-mlflow.service",
        "busfed-superlink.service",
        "busfed-supernode@.service",
    ]


@pytest.mark.parametrize("unit_path", UNITS, ids=lambda p: p.name)
def test_unit_runs_an_existing_console_script_with_real_flags(unit_path):
    unit = read_unit(unit_path)
    argv = exec_start(unit)
    assert argv[0].startswith(VENV_PREFIX), argv[0]
    assert (BIN / Path(argv[0]).name).is_file(), f"no console script {Path(argv[0]).name}"
    check_flags_exist(argv, unit_path.name)
    service = unit["Service"]
    assert service["User"] == "busfed" and service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict" and service["ReadWritePaths"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_supernode_unit_uses_the_site_key_ca_and_config():
    unit = read_unit(DEPLOY / "systemd" / "busfed-supernode@.service")
    argv = exec_start(unit)
    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options["--root-certificates"] == "/var/lib/busfed/%i/keys/ca.crt"
    assert options["--auth-supernode-private-key"] == "/var/lib/busfed/%i/keys/%i.key"
    # Flower parses the node config as the ClientApp will read it.
    assert parse_config_args([options["--node-config"]]) == {
        "site-config": "/var/lib/busfed/%i/site.toml"
    }
    assert "/var/lib/busfed/%i/state" in unit["Service"]["ReadWritePaths"].split()
    assert "--insecure" not in argv


def test_superlink_unit_has_tls_auth_database_and_no_runtime_installs(tmp_path):
    """The unit runs `busfed federation superlink`; the SuperLink it starts (the argv that
    command builds from a consortium folder) has TLS, node auth, a database in that folder
    and no runtime installs, with flags flower-superlink knows."""
    from deploy.federation.consortium import init_consortium
    from deploy.launcher import superlink_argv

    unit = read_unit(DEPLOY / "systemd" / "busfed-superlink.service")
    argv = exec_start(unit)
    assert argv[1:4] == ["federation", "superlink", "--dir"], argv
    folder = argv[4]
    assert folder in unit["Service"]["ReadWritePaths"].split()
    assert "130" in unit["Service"]["SuccessExitStatus"].split()  # busfed's exit on SIGTERM

    consortium = init_consortium(tmp_path / "consortium", hosts=["127.0.0.1"])
    built = superlink_argv(
        consortium.pki, host=consortium.listen, port=consortium.port, database=consortium.database
    )
    check_flags_exist(built, "busfed federation superlink")
    for flag in (
        "--database", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
    ):  # fmt: skip
        assert flag in built
    assert Path(built[built.index("--database") + 1]).parent == tmp_path / "consortium"
    assert Path(built[built.index("--ssl-keyfile") + 1]).is_file()


def test_mlflow_unit_is_light_and_reads_its_secrets_from_a_file():
    text = (DEPLOY / "systemd" / "busfed-mlflow.service").read_text()
    assert "Environment=MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in text
    argv = exec_start(read_unit(DEPLOY / "systemd" / "busfed-mlflow.service"))
    assert argv[argv.index("--workers") + 1] == "1"
    assert "EnvironmentFile=/etc/busfed/mlflow.env" in text
    example = (DEPLOY / "mlflow" / "mlflow.env.example").read_text()
    assert "MLFLOW_BACKEND_STORE_URI=postgresql://" in example
    assert "sqlite" in (DEPLOY / "mlflow" / "README.md").read_text().lower()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_systemd_accepts_the_units(tmp_path):
    names = []
    for unit in UNITS:
        name = unit.name.replace("@.", "@hospital-a.")
        text = unit.read_text().replace(VENV_PREFIX, f"{BIN}/")
        (tmp_path / name).write_text(text)
        names.append(f"./{name}")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    complaints = [line for line in result.stderr.splitlines() if "busfed" in line]
    assert result.returncode == 0 and not complaints, result.stderr


# ------------------------------------------------------------------ docker


def load_compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker" / name).read_text())


def check_compose_service(service: dict[str, Any], where: str) -> list[str]:
    build = service["build"]
    assert (DEPLOY / "docker" / build["context"] / build["dockerfile"]).is_file(), where
    argv = [str(a) for a in service["command"]]
    assert (BIN / argv[0]).is_file(), f"{where}: no console script {argv[0]}"
    check_flags_exist(argv, where)
    return argv


def test_consortium_compose_runs_superlink_and_mlflow_on_postgres():
    compose = load_compose("compose.consortium.yml")
    services = compose["services"]
    assert set(services) == {"superlink", "mlflow", "postgres"}

    superlink = check_compose_service(services["superlink"], "superlink")
    for flag in ("--database", "--enable-supernode-auth", "--ssl-certfile"):
        assert flag in flags(superlink)
    assert any(v.endswith(":/pki:ro") for v in services["superlink"]["volumes"])

    mlflow = check_compose_service(services["mlflow"], "mlflow")
    assert "--workers=1" in mlflow
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert services["mlflow"]["build"]["args"]["EXTRA_PIP"].startswith("psycopg2-binary==")
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    used = {
        v.split(":", 1)[0]
        for s in services.values()
        for v in s.get("volumes", [])
        if not v.startswith(("$", "/", "."))
    }
    assert used == set(compose["volumes"])


def test_site_compose_mounts_keys_config_and_data_read_only():
    service = load_compose("compose.site.yml")["services"]["supernode"]
    argv = check_compose_service(service, "supernode")
    node_config = next(a for a in argv if a.startswith("--node-config="))
    assert set(parse_config_args([node_config.split("=", 1)[1]])) == {"site-config"}
    volumes = service["volumes"]
    for mounted in ("/site.toml:", "/keys:", "${SITE_DATA:?set SITE_DATA}:"):
        assert [v for v in volumes if mounted in v and v.endswith(":ro")], mounted
    assert [v for v in volumes if "/state:" in v and not v.endswith(":ro")]
    assert service["read_only"] is True and service["user"]


def test_dockerfile_installs_the_project_in_one_pip_command():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    installs = re.findall(r"^RUN .*pip install.*$", text, re.M)
    assert installs == ["RUN pip install . ${EXTRA_PIP}"]
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert "torch===2.13.0" in (ROOT / "pyproject.toml").read_text()
    assert "torch===2.13.0" in text


# ------------------------------------------------------------------ runbooks


def shell_commands(markdown: str) -> list[list[str]]:
    """Commands in the ```sh blocks: continuations joined, heredocs skipped, split at ; && |."""
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        heredoc = None
        for line in block.replace("\\\n", " ").splitlines():
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            if match := re.search(r"<<'?(\w+)'?", line):
                heredoc = match.group(1)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens, current = list(lexer), list[str]()
            for token in [*tokens, ";"]:
                if set(token) <= set(";&|<>"):
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(token)
    return [_unwrapped(c) for c in commands]


def _unwrapped(argv: list[str]) -> list[str]:
    """The command behind ``sudo [-u USER]`` and ``VAR=value`` prefixes."""
    while argv:
        if argv[0] == "sudo":
            argv = argv[3:] if argv[1:2] == ["-u"] else argv[1:]
        elif re.match(r"^[A-Z_]+=", argv[0]):
            argv = argv[1:]
        else:
            break
    return argv


def inline_commands(markdown: str) -> list[list[str]]:
    """``busfed ...`` and ``flwr ...`` quoted inline in the prose."""
    return [shlex.split(m) for m in re.findall(r"`((?:busfed|flwr) [^`]+)`", markdown)]


@cache
def click_root(program: str) -> click.Command:
    if program == "busfed":
        from deploy.cli import app
    else:
        from flwr.cli.app import app
    return typer.main.get_command(app)


def resolve(argv: list[str]) -> tuple[list[str], click.Command]:
    """The subcommand path in ``argv`` and its click command; options are checked on it."""
    command, path = click_root(argv[0]), list[str]()
    for token in argv[1:]:
        if not isinstance(command, click.Group) or token.startswith("-"):
            break
        sub = command.get_command(click.Context(command), token)
        if sub is None:
            break
        command, path = sub, [*path, token]
    return path, command


def check_cli_command(argv: list[str], where: str) -> list[str]:
    path, command = resolve(argv)
    # A group alone only asks for its help: `busfed --help`, `busfed federation --help`.
    assert not isinstance(command, click.Group) or argv[1 + len(path) :] in ([], ["--help"]), (
        f"{where}: `{shlex.join(argv)}` names no command"
    )
    known = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    unknown = [flag for flag in flags(argv) if flag not in known]
    assert not unknown, f"{where}: `{' '.join([argv[0], *path])}` has no {unknown}"
    return path


def python_snippets(markdown: str) -> list[str]:
    return [
        argv[argv.index("-c") + 1]
        for argv in shell_commands(markdown)
        if argv and Path(argv[0]).name in ("python", "python3") and "-c" in argv
    ]


def check_snippet_calls(code: str, where: str) -> None:
    """Imports resolve, and each call of an imported name binds to its signature."""
    tree = ast.parse(code)
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module}.{alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target, skip_self = None, False
        if isinstance(node.func, ast.Name) and node.func.id in names:
            target = names[node.func.id]
        elif (
            isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Call)
            and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id in names
        ):
            owner = names[node.func.value.func.id]
            assert hasattr(owner, node.func.attr), f"{where}: no {owner.__name__}.{node.func.attr}"
            target, skip_self = getattr(owner, node.func.attr), True
        if target is None or not callable(target):
            continue
        args = [None] * (len(node.args) + skip_self)
        inspect.signature(target).bind(*args, **{k.arg: None for k in node.keywords if k.arg})


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.name)
def test_every_busfed_and_flwr_command_in_the_runbook_exists(runbook):
    text = runbook.read_text()
    commands = [
        argv
        for argv in shell_commands(text) + inline_commands(text)
        if argv and Path(argv[0]).name in ("busfed", "flwr")
    ]
    assert commands, f"{runbook.name} names no busfed or flwr command"
    for argv in commands:
        check_cli_command([Path(argv[0]).name, *argv[1:]], runbook.name)


@pytest.mark.parametrize("runbook", RUNBOOKS, ids=lambda p: p.name)
def test_python_one_liners_in_the_runbook_call_real_functions(runbook):
    snippets = python_snippets(runbook.read_text())
    assert snippets
    for code in snippets:
        check_snippet_calls(code, runbook.name)


def test_the_runbook_init_makes_a_ca_and_a_superlink_certificate(tmp_path):
    """The consortium runbook's `busfed federation init`, run into a temporary folder."""
    from deploy.cli import app

    argv = next(
        argv for argv in shell_commands((DEPLOY / "runbooks" / "consortium.md").read_text())
        if argv[:3] == ["busfed", "federation", "init"]
    )  # fmt: skip
    folder = argv.index("--dir") + 1
    argv[folder] = str(tmp_path / "consortium")
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "consortium" / "pki").iterdir()) == [
        "ca.crt", "ca.key", "server.crt", "server.key",
    ]  # fmt: skip
    assert (tmp_path / "consortium" / "consortium.toml").is_file()


def test_every_runbook_busfed_command_answers_help():
    """Each ``busfed`` command path named in a runbook answers ``--help`` with exit 0.

    The paths go through the same Typer app the venv's ``busfed`` script runs, in this
    process (one interpreter start per command would take seconds each); one real run of
    the script checks that it is that app.
    """
    paths = set()
    for runbook in RUNBOOKS:
        text = runbook.read_text()
        for argv in shell_commands(text) + inline_commands(text):
            if argv and Path(argv[0]).name == "busfed":
                paths.add(tuple(resolve(["busfed", *argv[1:]])[0]))
    assert {("site", "ingest"), ("site", "doctor"), ("audit", "verify")} <= paths
    lead = {"init", "superlink", "enrol", "revoke", "renew-cert", "start", "status", "stop"}
    assert {("federation", command) for command in lead} <= paths
    from deploy.cli import app

    runner = CliRunner()
    for path in sorted(paths):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"busfed {' '.join(path)} --help:\n{result.output}"

    script = BIN / "busfed"
    assert "from deploy.cli import main" in script.read_text()
    completed = subprocess.run(
        [str(script), "site", "--help"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    assert "ingest" in completed.stdout and "doctor" in completed.stdout
