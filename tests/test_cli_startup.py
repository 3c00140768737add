"""``busfed --help`` answers at once and reads at 80 columns (issue 15, point 7).

Every help took 15-24 s on a busy machine (about 5 s of CPU): the CLI imported torch,
Opacus, SciPy and Matplotlib to build its options. Each command now imports them when it
runs. Typer's Rich panels cut option names at 80 columns; help is click's plain text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from deploy.cli import HELP_WIDTH, _keep_lists, command

# What a command may load when it runs, never to print its help: each costs 0.1-2 s.
HEAVY = ("torch", "torchvision", "opacus", "flwr", "mlflow", "matplotlib", "scipy", "av")


def test_the_cli_loads_no_heavy_library_to_build_its_help():
    probe = (
        "import json, sys, time\n"
        "start = time.process_time()\n"
        "import deploy.cli\n"
        "deploy.cli.command()\n"
        "print(json.dumps({'cpu_s': time.process_time() - start, 'loaded': "
        f"[m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    found = json.loads(done.stdout)
    print(f"import deploy.cli and build every command: {found['cpu_s']:.2f} s of CPU")
    assert found["loaded"] == [], f"the CLI's help loads {found['loaded']}"


def test_busfed_help_runs_as_a_process_in_seconds():
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "busfed"), "site", "init", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "80"},
    )
    print(f"busfed site init --help: {time.monotonic() - started:.2f} s")
    assert done.returncode == 0, done.stderr
    assert "--noise-multiplier" in done.stdout


def _helps(cmd: click.Command, path: list[str], parent: click.Context | None = None):
    ctx = click.Context(cmd, info_name=path[-1], parent=parent, terminal_width=80)
    yield " ".join(path), cmd.get_help(ctx)
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _helps(sub, [*path, name], ctx)


def test_every_help_fits_80_columns_uncut_with_exit_codes_one_a_line():
    helps = dict(_helps(command(), ["busfed"]))
    assert len(helps) > 20 and "busfed federation start" in helps
    for path, text in helps.items():
        lines = text.splitlines()
        assert all(len(line) <= 80 for line in lines), (path, max(lines, key=len))
        assert "…" not in text and "\\[" not in text, (path, text)
        if "Exit codes:" in text:
            after = text.split("Exit codes:\n", 1)[1].splitlines()
            assert after[0].startswith("  0  "), (path, after[:2])
    # An option name is shown whole, with its metavar (Rich showed "--score-thresho…").
    assert "--score-threshold FLOAT" in helps["busfed evaluate"]


def test_lists_keep_one_item_a_line_and_wrap_with_a_hanging_indent():
    long_item = "3  " + "word " * 30
    text = "Prose that\nclick rewraps.\n\nExit codes:\n0  success\n" + long_item.strip()

    kept = _keep_lists(text)

    prose, codes = kept.split("\n\n")
    assert prose == "Prose that\nclick rewraps."  # left to click
    lines = codes.splitlines()
    assert lines[:3] == ["\b", "Exit codes:", "0  success"]
    assert lines[3].startswith("3  word") and len(lines) > 4
    assert all(line.startswith("   word") for line in lines[4:])
    assert all(len(line) <= HELP_WIDTH for line in lines)
