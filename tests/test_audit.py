"""The auditor's checks: every way a ledger can be altered is caught and named by file and line.

The ledgers are written by a simulated site (``tests.test_ledger``): the real
``SiteAccountant`` (Opacus) and ``PrivacyLedger``; the auditor recomputes with dp-accounting.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from common.keys import create_signing_key, load_signing_key, signing_key_paths
from common.privacy.ledger import GENESIS_HASH, canonical_json, line_hash, sign
from deploy.audit.cli import audit_app
from deploy.audit.verify import (
    EPSILON_ABS_TOLERANCE,
    EPSILON_REL_TOLERANCE,
    Problem,
    verify_ledger,
    verify_ledgers,
)
from tests.test_ledger import SimulatedSite, copy_site, make_site, simulate

runner = CliRunner()


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> tuple[SimulatedSite, SimulatedSite]:
    """Two hospitals enrolled in one keys folder; site-a has a refused round, site-b none."""
    root = tmp_path_factory.mktemp("sites")
    site_a = make_site(root, "site-a")
    assert simulate(site_a) == ["trained", "trained", "refused"]
    site_b = make_site(root, "site-b", budget=8.0)
    assert simulate(site_b, rounds=2) == ["trained", "trained"]
    return site_a, site_b


@pytest.fixture
def site(sites, tmp_path) -> SimulatedSite:
    """A copy of site-a's keys and ledger, free to tamper with."""
    return copy_site(sites[0], tmp_path)


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def rewrite(site: SimulatedSite, edits: dict[int, dict[str, Any]]) -> None:
    """Change fields of 1-based lines, then re-sign and re-chain with the site's own key.

    What a site holding its key could do to its own ledger: every signature and hash link
    stays valid, so only the order and epsilon checks can catch it.
    """
    key = load_signing_key(signing_key_paths(site.keys, site=site.name)[0])
    prev, out = GENESIS_HASH, []
    for number, line in enumerate(read_lines(site.ledger_path), start=1):
        fields = json.loads(line)
        fields.update(edits.get(number, {}))
        fields["prev_hash"] = prev
        del fields["signature"]
        fields["signature"] = sign(fields, key)
        out.append(canonical_json(fields))
        prev = line_hash(out[-1])
    write_lines(site.ledger_path, out)


def first_problem(site: SimulatedSite) -> Problem:
    result = verify_ledgers([site.ledger_path], site.keys)
    assert not result.ok
    problem = result.ledgers[0].problem
    assert problem is not None and problem.file == site.ledger_path
    return problem


def test_a_site_ledger_verifies_with_an_independent_accountant(sites):
    site_a, site_b = sites
    result = verify_ledgers([site_a.ledger_path, site_b.ledger_path], site_a.keys)
    assert result.ok, [ledger.problem for ledger in result.ledgers]
    a, b = result.ledgers
    assert (a.site, len(a.entries), b.site, len(b.entries)) == ("site-a", 6, "site-b", 4)
    for checked in a.entries + b.entries:
        # Opacus (site) and dp-accounting (auditor) agree far inside the tolerance here.
        assert checked.entry.epsilon_total == pytest.approx(checked.epsilon_total, rel=2e-3)
    assert [c.entry.status for c in a.entries].count("refused") == 2


def test_a_changed_byte_breaks_that_entry_signature(site):
    lines = read_lines(site.ledger_path)
    at = lines[2].index(b'"epsilon_total":') + len(b'"epsilon_total":') + 2  # a decimal digit
    digit = lines[2][at : at + 1]
    lines[2] = lines[2][:at] + (b"7" if digit != b"7" else b"8") + lines[2][at + 1 :]
    write_lines(site.ledger_path, lines)
    problem = first_problem(site)
    assert problem.line == 3
    assert "signature does not verify" in problem.reason


@pytest.mark.parametrize("removed", [1, 4])
def test_a_removed_line_breaks_the_chain(site, removed):
    lines = read_lines(site.ledger_path)
    del lines[removed - 1]
    write_lines(site.ledger_path, lines)
    problem = first_problem(site)
    assert problem.line == removed
    assert "prev_hash" in problem.reason


def test_swapped_lines_break_the_chain(site):
    lines = read_lines(site.ledger_path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(site.ledger_path, lines)
    problem = first_problem(site)
    assert problem.line == 3
    assert "prev_hash is not the SHA-256 of line 2" in problem.reason


def test_another_sites_key_fails_the_first_signature(site, tmp_path):
    other = create_signing_key(tmp_path / "other", site="site-a")[1]
    shutil.copy(other, signing_key_paths(site.keys, site="site-a")[1])
    problem = first_problem(site)
    assert (problem.line, problem.reason.split(" with ")[0]) == (1, "signature does not verify")


def test_an_unenrolled_site_fails(site):
    signing_key_paths(site.keys, site="site-a")[1].unlink()
    problem = first_problem(site)
    assert problem.line == 1
    assert "site 'site-a' is not enrolled" in problem.reason


def test_a_forged_epsilon_resigned_with_the_right_key_fails_the_recomputation(site):
    entries = site.ledger().entries()
    forged = entries[3].epsilon_total * 0.9
    rewrite(site, {4: {"epsilon_total": forged}})
    problem = first_problem(site)
    assert problem.line == 4
    assert f"epsilon_total {forged:.5f} but dp-accounting (rdp) composes" in problem.reason


def test_a_forged_round_epsilon_fails(site):
    rewrite(site, {1: {"epsilon_round": 1.0}})
    problem = first_problem(site)
    assert problem.line == 1
    assert problem.reason.startswith("epsilon_round 1 but dp-accounting (rdp) gets")


def test_the_tolerance_is_relative_plus_absolute(site):
    entries = site.ledger().entries()
    recorded = entries[3].epsilon_total
    inside = recorded * (1 + EPSILON_REL_TOLERANCE) + EPSILON_ABS_TOLERANCE / 2
    rewrite(site, {4: {"epsilon_total": inside}})
    assert verify_ledger(site.ledger_path, site.keys).ok
    outside = recorded * (1 + EPSILON_REL_TOLERANCE) + EPSILON_ABS_TOLERANCE * 2
    rewrite(site, {4: {"epsilon_total": outside}})
    assert first_problem(site).line == 4


def test_a_decreasing_round_fails(site):
    rewrite(site, {5: {"round": 1}})
    problem = first_problem(site)
    assert (problem.line, problem.reason) == (5, "round decreases from 2 to 1 in run 'run-1'")


def test_a_repeated_round_and_model_fails(site):
    rewrite(site, {6: {"model": "detector"}})
    problem = first_problem(site)
    assert problem.line == 6
    assert problem.reason == "a second entry for round 3, model 'detector' in run 'run-1'"


def test_runs_follow_each_other_and_never_return(site):
    # A second run starts from round 1 again: fine, the site's accountant spans runs.
    rewrite(site, {n: {"run_id": "run-2", "round": (n - 1) // 2} for n in range(3, 7)})
    assert verify_ledger(site.ledger_path, site.keys).ok
    rewrite(site, {5: {"run_id": "run-1", "round": 3}, 6: {"run_id": "run-1", "round": 3}})
    problem = first_problem(site)
    assert (problem.line, problem.reason) == (5, "run 'run-1' reappears after run 'run-2' started")


def test_training_past_the_budget_fails(site):
    entries = site.ledger().entries()
    rewrite(site, {n: {"budget": 4.0} for n in range(1, 7)})
    over = next(n for n, e in enumerate(entries, start=1) if e.epsilon_total > 4.0)
    problem = first_problem(site)
    assert problem.line == over
    assert problem.reason.endswith("exceeds the budget 4")


def test_a_torn_last_line_fails(site):
    with site.ledger_path.open("ab") as f:
        f.write(b'{"site":"site-a","run_id":"ru')
    problem = first_problem(site)
    assert problem.line == 7
    assert "incomplete" in problem.reason


def test_a_prv_ledger_verifies_against_dp_accounting_pld(tmp_path):
    site = make_site(tmp_path, accountant_kind="prv")
    assert simulate(site, rounds=1) == ["trained"]
    verdict = verify_ledger(site.ledger_path, site.keys)
    assert verdict.ok, verdict.problem


# ---------------------------------------------------------------------------- CLI


def test_verify_exit_codes_and_json(sites, site, tmp_path):
    site_a, site_b = sites
    ok = runner.invoke(audit_app, ["verify", str(site_a.ledger_path), str(site_b.ledger_path),
                                   "--keys", str(site_a.keys)])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "verified" in ok.output

    lines = read_lines(site.ledger_path)
    del lines[1]
    write_lines(site.ledger_path, lines)
    bad = runner.invoke(audit_app, ["verify", str(site_a.ledger_path), str(site.ledger_path),
                                    "--keys", str(site.keys), "--json"])  # fmt: skip
    assert bad.exit_code == 1, bad.output
    result = json.loads(bad.stdout)
    assert result["ok"] is False
    assert [ledger["ok"] for ledger in result["ledgers"]] == [True, False]
    assert result["ledgers"][1]["problem"]["file"] == str(site.ledger_path)
    assert result["ledgers"][1]["problem"]["line"] == 2

    plain = runner.invoke(audit_app, ["verify", str(site.ledger_path), "--keys", str(site.keys)])
    assert plain.exit_code == 1
    assert f"{site.ledger_path}:2: prev_hash" in plain.output


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "{tmp}/missing.jsonl", "--keys", "{keys}"],
        ["verify", "{ledger}", "--keys", "{tmp}/no-keys"],
        ["verify", "{ledger}"],
        ["verify", "--keys", "{keys}"],
    ],
    ids=["missing-ledger", "missing-keys-dir", "no-keys-option", "no-ledger"],
)
def test_verify_bad_usage_exits_2(site, tmp_path, args):
    values = {"tmp": tmp_path, "keys": site.keys, "ledger": site.ledger_path}
    result = runner.invoke(audit_app, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output


# ---------------------------------------------------------------------------- report


def _chromium() -> str | None:
    return next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )


def _report(sites, out: Path, *extra: str) -> Any:
    site_a, site_b = sites
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = out.parent / "versions.json"
    versions.write_text(json.dumps({"1": "1", "2": "2"}))
    return runner.invoke(audit_app, ["report", str(site_a.ledger_path), str(site_b.ledger_path),
                                     "--keys", str(site_a.keys), "--out", str(out),
                                     "--versions", str(versions), *extra])  # fmt: skip


def test_report_is_self_contained_with_plots_beside_it(sites, tmp_path):
    out = tmp_path / "report" / "audit.html"
    result = _report(sites, out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count('<img src="data:image/png;base64,') == 2
    for needle in ("VERIFIED", "site-a", "site-b", "model version", "Refusals"):
        assert needle in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs == ["audit-site-a.png", "audit-site-b.png"]
    for png in out.parent.glob("*.png"):
        assert Image.open(png).size[0] > 600


def test_a_failed_verification_is_at_the_top_of_the_report(sites, site, tmp_path):
    rewrite(site, {2: {"epsilon_total": 9.0}})
    out = tmp_path / "audit.html"
    result = runner.invoke(audit_app, ["report", str(site.ledger_path), "--keys", str(site.keys),
                                       "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1
    page = out.read_text()
    assert page.index("VERIFICATION FAILED") < page.index("<h2>")
    assert f"{site.ledger_path}:2: epsilon_total 9" in page
    assert "model version" not in page


def test_report_renders_in_a_headless_browser(sites, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian package: chromium)")
    out = tmp_path / "audit.html"
    assert _report(sites, out).exit_code == 0
    shot = tmp_path / "shot.png"
    base = [chromium, "--headless", "--disable-gpu", "--no-sandbox",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]  # fmt: skip
    subprocess.run([*base, f"--screenshot={shot}", out.as_uri()], check=True, timeout=120,
                   capture_output=True)  # fmt: skip
    dom = subprocess.run([*base, "--dump-dom", out.as_uri()], check=True, timeout=120,
                         capture_output=True, text=True).stdout  # fmt: skip

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(maxcolors=100_000)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) one colour"
    assert dom.count("<img") == 2
    assert dom.count("data:image/png;base64,") == 2
    for needle in ("VERIFIED", "site-a", "site-b"):
        assert needle in dom


def test_the_budget_line_spans_every_round_even_a_single_one():
    from deploy.audit.report import budget_steps

    assert budget_steps([8.0]) == ([-0.5, 0.5], [8.0, 8.0])  # one round: still a line
    assert budget_steps([8.0, 8.0, 10.0]) == ([-0.5, 0.5, 1.5, 2.5], [8.0, 8.0, 10.0, 10.0])
