"""Secure randomness: a CSPRNG draws the DP noise and the patients when the site says so.

The distribution tests draw a fixed number of values from an unseeded CSPRNG, so each
bound is set where a correct generator fails it with probability below 1e-8; a positive
control shows each bound rejects a slightly wrong distribution.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from client import secure_rng
from client.secure_rng import NOISE_DRAWS, ChaCha20Random
from client.site import EVENTS_FILE, SiteClient
from client.train import train_classifier
from common.config import SiteConfig, load_site_config, render_site_config
from common.keys import load_signing_key, signing_key_paths
from common.models.bundle import build_bundle, get_weights
from common.models.i3d import build_classifier
from common.models.presets import get_preset
from common.privacy.ledger import (
    GENESIS_HASH,
    LEDGER_FILE,
    PrivacyLedger,
    canonical_json,
    line_hash,
    sign,
)
from common.privacy.settings import DPSettings
from deploy.audit.report import write_report
from deploy.audit.verify import AuditResult, verify_ledger
from deploy.demo import DemoSettings, prepare_sites
from tests.test_dp import _classifier_units, _flat
from tests.test_ledger import copy_site, make_site, refusal, simulate

CPU = torch.device("cpu")
TINY = get_preset("tiny")
N = 2**20
# Kolmogorov-Smirnov: P(D > sqrt(ln(2 / alpha) / (2 n))) <= alpha (DKW), alpha = 1e-9.
KS_BOUND = math.sqrt(math.log(2 / 1e-9) / (2 * N))
SIX_SE = 6 / math.sqrt(N)  # six standard errors of a mean of N unit-variance values


def ks_normal(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample ``z`` and N(0, 1)."""
    z = z.double().flatten().sort().values
    cdf = torch.special.ndtr(z)
    n = len(z)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier(TINY.classifier).train()


def train_once(classifier: torch.nn.Module, *, secure_rng: bool, **dp: float) -> torch.Tensor:
    """The classifier's weights after one step from the same seed, units and weights."""
    model = build_classifier(TINY.classifier)
    model.load_state_dict(classifier.state_dict())
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 0.1, "sample_rate": 1.0, **dp}
    train_classifier(
        model, _classifier_units([1, 2, 1]), dp=DPSettings.allowing_noise_off(**settings),
        steps=1, lr=1.0,
        device=CPU, generator=torch.Generator().manual_seed(5), secure_rng=secure_rng,
    )  # fmt: skip
    return _flat(model)


def test_one_seed_repeats_seeded_noise_and_never_secure_noise(classifier):
    seeded = [train_once(classifier, secure_rng=False) for _ in range(2)]
    secure = [train_once(classifier, secure_rng=True) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    # Same seed, same data, same weights: only the noise can differ, and in every coordinate.
    assert bool((secure[0] != secure[1]).all())
    assert not torch.equal(secure[0], seeded[0])


def test_the_csprng_draws_every_sample_and_all_the_noise(classifier, monkeypatch):
    drawn: list[int] = []
    words = ChaCha20Random.words

    def spy(self: ChaCha20Random, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        drawn.append(n)
        return words(self, n, device)

    monkeypatch.setattr(ChaCha20Random, "words", spy)
    model = build_classifier(TINY.classifier)
    model.load_state_dict(classifier.state_dict())
    generator = torch.Generator().manual_seed(5)
    seeded_state, global_state = generator.get_state(), torch.get_rng_state()
    numels = [p.numel() for p in model.parameters()]
    units, steps = _classifier_units([1, 2, 1]), 2
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=0.5)
    record = train_classifier(
        model, units, dp=dp, steps=steps, lr=1.0, device=CPU, generator=generator,
        secure_rng=True,
    )  # fmt: skip
    # Per step: one uniform per patient for the Poisson draw, then four normals per weight.
    assert drawn == [len(units), *(NOISE_DRAWS * n for n in numels)] * steps
    assert record.noise_source == "chacha20-csprng"
    # Neither the seeded generator nor torch's global one drew anything.
    assert torch.equal(generator.get_state(), seeded_state)
    assert torch.equal(torch.get_rng_state(), global_state)

    drawn.clear()
    record = train_classifier(
        model, units, dp=dp, steps=steps, lr=1.0, device=CPU, generator=generator,
        secure_rng=False,
    )  # fmt: skip
    assert drawn == [] and record.noise_source == "torch-prng-insecure"
    assert not torch.equal(generator.get_state(), seeded_state)


def test_zero_noise_is_exactly_the_seeded_update(classifier):
    """With sigma 0 and q 1 nothing is random: both modes take the same step."""
    secure = train_once(classifier, secure_rng=True, noise_multiplier=0.0)
    seeded = train_once(classifier, secure_rng=False, noise_multiplier=0.0)
    assert torch.equal(secure, seeded)


def test_normals_are_standard():
    z = ChaCha20Random().standard_normal(N)
    assert z.dtype == torch.float64 and z.shape == (N,)
    assert abs(float(z.mean())) < SIX_SE
    assert abs(float(z.var()) - 1) < SIX_SE * math.sqrt(2)  # var of a variance: 2 / N
    assert ks_normal(z) < KS_BOUND
    # The positive control: 5% too wide is rejected (its distance is ~0.012).
    assert ks_normal(1.05 * z) > KS_BOUND


def test_noise_is_sigma_times_standard_normal_in_the_reference_dtype():
    reference = torch.zeros(N // 4, 4, dtype=torch.float32)
    noise = ChaCha20Random().gaussian_like(reference, 2.5)
    assert (noise.shape, noise.dtype, noise.device) == (reference.shape, torch.float32, CPU)
    assert ks_normal(noise / 2.5) < KS_BOUND
    assert ks_normal(noise / 2.4) > KS_BOUND
    assert torch.equal(ChaCha20Random().gaussian_like(reference, 0.0), reference)


def test_uniforms_have_53_random_bits_in_0_1():
    u = ChaCha20Random().uniform(N)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    k = (u * 2.0**53).long()
    assert torch.equal(k.double(), u * 2.0**53)  # multiples of 2^-53
    # The 53rd bit is random too (float32's 24 bits would leave it always 0).
    assert abs(float(k.bitwise_and(1).double().mean()) - 0.5) < SIX_SE / 2
    sorted_u = u.sort().values
    grid = torch.arange(1, N + 1, dtype=torch.float64) / N
    assert float((grid - sorted_u).abs().max()) < KS_BOUND + 1 / N


def test_a_fresh_key_before_the_stream_would_wrap(monkeypatch):
    keys: list[int] = []
    urandom = secure_rng.os.urandom

    def counted(n: int) -> bytes:
        keys.append(n)
        return urandom(n)

    monkeypatch.setattr(secure_rng, "_REKEY_BYTES", 64)
    monkeypatch.setattr(secure_rng.os, "urandom", counted)
    rng = ChaCha20Random()
    words = rng.words(20)  # 160 bytes: the first key's 64, the second's 64, a third's 32
    assert keys == [32, 32, 32]
    assert len(set(words.tolist())) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_noise_on_the_gpu_comes_from_host_bits():
    reference = torch.zeros(N, device="cuda")
    noise = ChaCha20Random().gaussian_like(reference, 1.0)
    assert noise.device == reference.device and noise.dtype == torch.float32
    assert ks_normal(noise.cpu()) < KS_BOUND


def test_the_site_config_states_secure_rng_and_round_trips(tmp_path):
    config = load_site_config(
        prepare_sites(tmp_path, DemoSettings(sites=1, patients=4), Console(quiet=True))[0]
    )
    assert config.privacy.secure_rng  # the demo runs the product path
    off = config.model_copy(
        update={"privacy": config.privacy.model_copy(update={"secure_rng": False})}
    )
    text = render_site_config(off)
    assert "\nsecure_rng = false  # " in text
    path = tmp_path / "off.toml"
    path.write_text(text)
    loaded = load_site_config(path)
    assert not loaded.privacy.secure_rng
    assert loaded.privacy == off.privacy
    # A config from before the setting existed draws securely.
    path.write_text("\n".join(line for line in text.splitlines() if "secure_rng" not in line))
    assert load_site_config(path).privacy.secure_rng


def site_with(config_path: Path, *, secure_rng: bool) -> SiteConfig:
    config = load_site_config(config_path)
    privacy = config.privacy.model_copy(update={"secure_rng": secure_rng})
    return config.model_copy(update={"privacy": privacy})


@pytest.mark.parametrize("secure", [True, False])
def test_a_site_trains_with_the_configured_randomness_and_logs_turning_it_off(
    tmp_path, caplog, secure
):
    config_path = prepare_sites(
        tmp_path, DemoSettings(sites=3, patients=4, frames=16, size=64), Console(quiet=True)
    )[0]
    config = site_with(config_path, secure_rng=secure)
    client = SiteClient(config, {"preset": "tiny", "local-steps": 1, "learning-rate": 0.05})
    with caplog.at_level(logging.WARNING):
        client.fit(get_weights(build_bundle("tiny", seed=0)), {"round": 1, "run_id": "r1"})
    state = config.site.state
    events = [json.loads(line) for line in (state / EVENTS_FILE).read_text().splitlines()]
    ledger = [json.loads(line) for line in (state / LEDGER_FILE).read_text().splitlines()]
    warned = [r for r in caplog.records if "secure_rng = false" in r.getMessage()]
    if secure:
        assert not warned and "insecure-rng" not in [e["event"] for e in events]
        assert {e["noise_source"] for e in ledger} == {"chacha20-csprng"}
    else:
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING
        assert "predictable" in warned[0].getMessage()
        (event,) = [e for e in events if e["event"] == "insecure-rng"]
        assert event["round"] == 1 and "seeded torch generator" in event["reason"]
        assert {e["noise_source"] for e in ledger} == {"torch-prng-insecure"}
    assert [e["model"] for e in ledger] == ["detector", "classifier"]


def test_a_ledger_from_before_noise_source_still_verifies_and_grows(tmp_path):
    """Old entries lack the field: they verify, a site appends to them, the report says so."""
    site = make_site(tmp_path / "made")
    simulate(site, rounds=1)
    site = copy_site(site, tmp_path / "old")
    key = load_signing_key(signing_key_paths(site.keys, site=site.name)[0])
    prev, lines = GENESIS_HASH, []
    for line in site.ledger_path.read_bytes().splitlines():
        fields = json.loads(line)
        del fields["noise_source"], fields["signature"]
        fields["prev_hash"] = prev
        fields["signature"] = sign(fields, key)  # as the site signed it before the field
        lines.append(canonical_json(fields))
        prev = line_hash(lines[-1])
    site.ledger_path.write_bytes(b"".join(line + b"\n" for line in lines))

    ledger = PrivacyLedger(site.ledger_path, site=site.name, signing_key=key)
    assert [e.noise_source for e in ledger.entries()] == [None, None]
    last = ledger.last()
    assert last is not None
    ledger.append(**refusal(last, 2, "detector"))
    assert [e.noise_source for e in ledger.entries()] == [None, None, "chacha20-csprng"]
    verdict = verify_ledger(site.ledger_path, site.keys)
    assert verdict.ok, verdict.problem
    assert b"null" not in site.ledger_path.read_bytes()

    report = tmp_path / "audit.html"
    write_report(AuditResult([verdict]), report)
    page = report.read_text()
    assert "<th>noise source</th>" in page
    assert page.count("<td>not recorded</td>") == 2 and page.count("<td>chacha20-csprng</td>") == 1


@pytest.mark.parametrize(("proposed", "expected"), [(0.01, 0.01), (0.0, 0.05), (None, 0.05)])
def test_the_detector_takes_its_own_learning_rate(tmp_path, monkeypatch, proposed, expected):
    """detector-learning-rate reaches the detector's DP-SGD; 0 or absent: learning-rate."""
    import client.site as site_module

    used: dict[str, float] = {}
    for name, trainer in list(site_module.TRAINERS.items()):

        def spy(*args, _name=name, _trainer=trainer, **kwargs):
            used[_name] = kwargs["lr"]
            return _trainer(*args, **kwargs)

        monkeypatch.setitem(site_module.TRAINERS, name, spy)
    config_path = prepare_sites(
        tmp_path, DemoSettings(sites=1, patients=4, frames=16, size=64), Console(quiet=True)
    )[0]
    run_config = {"preset": "tiny", "local-steps": 1, "learning-rate": 0.05}
    if proposed is not None:
        run_config["detector-learning-rate"] = proposed
    client = SiteClient(site_with(config_path, secure_rng=False), run_config)
    client.fit(get_weights(build_bundle("tiny", seed=0)), {"round": 1, "run_id": "r1"})
    assert used == {"detector": expected, "classifier": 0.05}
