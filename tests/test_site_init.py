"""``busfed site init``: a config the site loads, private keys, no overwrites, no defaults."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import CAMPAIGN_ROUNDS, site_app
from common.config import load_site_config
from common.data.manifest import write_manifest
from common.keys import load_signing_key, load_verify_key
from common.privacy.ledger import PrivacyLedger
from common.privacy.settings import DPSettings
from deploy.audit.verify import verify_ledger
from deploy.demo import DemoSettings, demo_site_config

runner = CliRunner()
PRIVACY = {
    "--epsilon-budget": "8",
    "--delta": "1e-5",
    "--noise-multiplier": "1.5",
    "--max-grad-norm": "1.0",
    "--sample-rate": "0.3",
}


def init(directory: Path, data: Path, *, drop: str | None = None, **override: str):
    options = {"--name": "site-a", "--data": str(data), **PRIVACY}
    options.update({f"--{k.replace('_', '-')}": v for k, v in override.items()})
    options.pop(drop or "", None)
    args = ["init", str(directory), *(x for pair in options.items() for x in pair)]
    return runner.invoke(site_app, args)


def test_init_writes_a_config_the_site_loads_and_private_keys(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    result = init(tmp_path / "site", data, threads="2", accountant="prv")
    assert result.exit_code == 0, result.output

    config = load_site_config(tmp_path / "site" / "site.toml")
    assert (config.site.name, config.site.data, config.site.threads) == ("site-a", data, 2)
    assert config.site.state == tmp_path / "site" / "state"
    privacy = config.privacy
    assert (privacy.epsilon_budget, privacy.delta, privacy.accountant) == (8.0, 1e-5, "prv")
    assert privacy.require_secure_aggregation
    assert privacy.secure_rng
    assert "\nsecure_rng = true  # " in (tmp_path / "site" / "site.toml").read_text()
    for model in (privacy.detector, privacy.classifier):
        assert (model.noise_multiplier, model.max_grad_norm, model.sample_rate) == (1.5, 1.0, 0.3)
    training = config.training
    assert (training.frame_stride, training.max_frames_per_video, training.max_local_steps) == (
        2,
        16,
        3,
    )

    keys = tmp_path / "site" / "keys"
    assert sorted(p.name for p in keys.iterdir()) == [
        "site-a.key",
        "site-a.ledger.key",
        "site-a.ledger.pub",
        "site-a.pub",
    ]
    for private in ("site-a.key", "site-a.ledger.key"):
        assert stat.S_IMODE((keys / private).stat().st_mode) == 0o600
    assert (keys / "site-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    load_verify_key(keys / "site-a.ledger.pub")

    send, never = result.output.split("Never send")
    assert str(keys / "site-a.pub") in send and str(keys / "site-a.ledger.pub") in send
    assert str(keys / "site-a.key") in never and str(keys / "site-a.ledger.key") in never
    assert ".key" not in send.split("Send to the consortium")[1]


def test_the_ledger_key_from_init_signs_what_the_auditor_verifies(tmp_path):
    assert init(tmp_path / "site", tmp_path).exit_code == 0
    keys = tmp_path / "site" / "keys"
    ledger = PrivacyLedger(
        tmp_path / "ledger.jsonl",
        site="site-a",
        signing_key=load_signing_key(keys / "site-a.ledger.key"),
    )
    ledger.append(
        run_id="run-1", round=1, model="detector", privacy_unit="patient", n_units=40,
        dp=DPSettings(noise_multiplier=1.5, max_grad_norm=1.0, sample_rate=0.3), steps=0,
        delta=1e-5,
        accountant="rdp", epsilon_round=0.0, epsilon_total=0.0, budget=8.0, status="refused",
        noise_source="chacha20-csprng",
    )  # fmt: skip
    auditor_keys = tmp_path / "consortium-keys"
    auditor_keys.mkdir()
    (auditor_keys / "site-a.ledger.pub").write_bytes((keys / "site-a.ledger.pub").read_bytes())
    assert verify_ledger(tmp_path / "ledger.jsonl", auditor_keys).ok


def test_init_never_overwrites(tmp_path):
    assert init(tmp_path / "site", tmp_path).exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "site").rglob("*") if p.is_file()}
    again = init(tmp_path / "site", tmp_path, epsilon_budget="80")
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output
    assert {p: p.read_bytes() for p in (tmp_path / "site").rglob("*") if p.is_file()} == before


def test_an_existing_key_alone_stops_init_before_it_writes(tmp_path):
    keys = tmp_path / "site" / "keys"
    keys.mkdir(parents=True)
    (keys / "site-a.ledger.key").write_text("the site's old key")
    result = init(tmp_path / "site", tmp_path)
    assert result.exit_code == 2
    assert "site-a.ledger.key" in result.output
    assert sorted(p.name for p in (tmp_path / "site").rglob("*")) == ["keys", "site-a.ledger.key"]


@pytest.mark.parametrize("missing", list(PRIVACY))
def test_privacy_values_have_no_defaults(tmp_path, missing):
    result = init(tmp_path / "site", tmp_path, drop=missing)
    assert result.exit_code == 2
    assert missing in result.output
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("delta", "2"), ("sample_rate", "0"), ("epsilon_budget", "-1"), ("name", "a b"),
     ("accountant", "opacus"), ("device", "tpu")],
)  # fmt: skip
def test_invalid_values_name_the_option_and_write_nothing(tmp_path, option, value):
    result = init(tmp_path / "site", tmp_path, **{option: value})
    assert result.exit_code == 2
    assert f"--{option.replace('_', '-')}" in result.output
    assert not (tmp_path / "site").exists()


def test_init_prints_a_suggestion_and_writes_only_the_sites_values(tmp_path):
    result = init(tmp_path / "site", tmp_path, patients="40", campaign_epsilon="8")
    assert result.exit_code == 0, result.output
    suggestion = result.output.split("Privacy suggestion")[1]
    words = " ".join(suggestion.split())  # rich wraps at 80 columns
    assert "the site decides; these values are not written" in words
    assert "40 training patients (--patients)" in words
    assert "3 rounds x 3 steps x 2 networks (wauve) = 18 DP steps" in words
    row = next(line for line in suggestion.splitlines() if line.startswith("│ 8 "))
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    target, q, sigma, c, steps, reached, delta, _ = cells
    assert (target, q, c, steps, delta) == ("8", "1", "1", "18", "1e-05")
    assert float(reached) <= 8
    assert all(len(line) <= 80 for line in suggestion.splitlines())

    text = (tmp_path / "site" / "site.toml").read_text()
    assert sigma not in text
    privacy = load_site_config(tmp_path / "site" / "site.toml").privacy
    for model in (privacy.detector, privacy.classifier):
        assert (model.noise_multiplier, model.sample_rate) == (1.5, 0.3)


def test_suggest_privacy_counts_the_training_patients_of_the_sites_manifest(tmp_path):
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    rows = []
    for i in range(30):  # 24 training patients with two videos each, 6 held out
        for sweep in (1, 2):
            video = f"videos/p{i}-{sweep}.mp4"
            (data / video).touch()  # counting opens no video
            rows.append((video, f"p{i}", "benign", "", "", "", "", "train" if i < 24 else "test"))
    write_manifest(data, rows, [])
    assert init(tmp_path / "site", data).exit_code == 0
    before = (tmp_path / "site" / "site.toml").read_bytes()

    result = runner.invoke(
        site_app,
        ["suggest-privacy", "--config", str(tmp_path / "site" / "site.toml"),
         "--campaign-model", "detector"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    words = " ".join(result.output.split())
    assert "24 training patients (counted in the site's manifest.csv)" in words
    assert "3 rounds x 3 steps x 1 network (detector) = 9 DP steps" in words
    assert [line.split("│")[1].strip() for line in result.output.splitlines()
            if line.startswith("│ ")] == ["1", "3", "8"]  # fmt: skip
    assert "Your site.toml values would spend" in words
    assert (tmp_path / "site" / "site.toml").read_bytes() == before


def test_without_a_patient_count_init_says_how_to_get_a_suggestion(tmp_path):
    result = init(tmp_path / "site", tmp_path / "not-yet")
    assert result.exit_code == 0, result.output
    assert "no suggestion:" in result.output and "--patients N" in result.output


@pytest.mark.parametrize(
    ("option", "value"),
    [("campaign_epsilon", "-1"), ("campaign_rounds", "0"), ("campaign_model", "resnet")],
)
def test_a_bad_campaign_option_is_named_and_nothing_is_written(tmp_path, option, value):
    result = init(tmp_path / "site", tmp_path, patients="40", **{option: value})
    assert result.exit_code == 2
    assert f"--{option.replace('_', '-')}" in result.output
    assert not (tmp_path / "site").exists()


def test_the_default_campaign_is_the_demos():
    # rounds as `busfed demo` runs; steps per round default to the site's cap, the demo's
    assert DemoSettings().rounds == CAMPAIGN_ROUNDS
    assert DemoSettings().local_steps == demo_site_config("a", Path("a")).training.max_local_steps


def test_the_sites_own_values_are_weighed_against_its_budget(tmp_path):
    # sigma 1.5, q 0.3, 18 steps of each network spend about 5.4 at delta 1e-5
    within = init(tmp_path / "a", tmp_path, patients="40", campaign_epsilon="8")
    over = init(tmp_path / "b", tmp_path, patients="40", campaign_epsilon="8", epsilon_budget="2")
    assert "on this campaign (budget 8)." in " ".join(within.output.split())
    assert "(budget 2): over the budget" in " ".join(over.output.split())
