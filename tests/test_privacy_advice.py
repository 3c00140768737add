"""The privacy suggestion: sigma spends the target epsilon, moves as it should, refuses nonsense."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import UsageError
from common.privacy.accountant import SiteAccountant
from common.privacy.advice import SMALL_SITE_NOISE, suggest_privacy

# q = 1 below 64 patients: the accountant's closed form, fast enough to call often
CAMPAIGN: dict[str, Any] = {"rounds": 3, "steps_per_round": 3, "networks": 2}


def test_sigma_spends_the_target_epsilon_within_one_percent():
    s = suggest_privacy(
        patients=1000, epsilon=8.0, delta=1e-3, rounds=10, steps_per_round=20, networks=2
    )
    assert (s.sample_rate, s.steps) == (64 / 1000, 400)
    spent = SiteAccountant().epsilon_if(1e-3, [(s.noise_multiplier, s.sample_rate, s.steps)])
    assert spent == pytest.approx(s.epsilon_reached)
    assert 0.99 * 8.0 <= spent <= 8.0
    # the smallest such sigma: 1 % less noise spends more than the target
    less = SiteAccountant().epsilon_if(1e-3, [(s.noise_multiplier * 0.99, s.sample_rate, 400)])
    assert less > 8.0
    assert s.noise_per_mean == pytest.approx(s.noise_multiplier / 64)
    assert not s.small and s.verdict.startswith("workable")


def test_more_patients_less_noise_larger_epsilon_smaller_sigma():
    by_patients = [
        suggest_privacy(patients=n, epsilon=3.0, delta=1e-3, **CAMPAIGN) for n in (16, 32, 60)
    ]
    noise = [s.noise_per_mean for s in by_patients]
    assert noise[0] > noise[1] > noise[2]
    by_epsilon = [
        suggest_privacy(patients=32, epsilon=e, delta=1e-3, **CAMPAIGN) for e in (1, 3, 8)
    ]
    sigma = [s.noise_multiplier for s in by_epsilon]
    assert sigma[0] > sigma[1] > sigma[2]
    assert all(s.epsilon_reached <= s.epsilon for s in by_patients + by_epsilon)


def test_a_small_site_is_told_so_and_what_would_help():
    s = suggest_privacy(patients=20, epsilon=1.0, delta=0.1, **CAMPAIGN)
    assert s.small and s.noise_per_mean > SMALL_SITE_NOISE and s.sample_rate == 1
    assert "small site for this campaign" in s.verdict
    assert "patients" in s.verdict and "larger epsilon than 1" in s.verdict
    assert "q = 1" in s.verdict
    assert "delta 0.1 is above 1/patients" in s.verdict


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [("patients", 0, "--patients"), ("epsilon", 0.0, "--campaign-epsilon"),
     ("epsilon", float("nan"), "--campaign-epsilon"), ("epsilon", 1e3, "--campaign-epsilon"),
     ("delta", 1.0, "--delta"), ("rounds", 0, "--campaign-rounds"),
     ("steps_per_round", -1, "--steps-per-round"), ("batch_patients", 0, "--batch-patients"),
     ("networks", 0, "--campaign-model")],
)  # fmt: skip
def test_nonsense_is_refused_naming_the_option(field, value, option):
    arguments = {"patients": 100, "epsilon": 8.0, "delta": 1e-3, **CAMPAIGN, field: value}
    with pytest.raises(UsageError, match=option):
        suggest_privacy(**arguments)
