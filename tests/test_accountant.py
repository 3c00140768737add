"""The site accountant against Google's dp-accounting, and its state round trip."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import DataError, PrivacyError
from common.privacy.accountant import AccountantKind, SiteAccountant

DELTA = 1e-5


def _google(mechanisms: list[tuple[float, float, int]]) -> float:
    accountant = RdpAccountant()
    for sigma, q, steps in mechanisms:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    return accountant.get_epsilon(DELTA)


def _ours(
    mechanisms: list[tuple[float, float, int]], kind: AccountantKind = "rdp"
) -> SiteAccountant:
    accountant = SiteAccountant(kind)
    for sigma, q, steps in mechanisms:
        accountant.record(sigma, q, steps)
    return accountant


def test_single_mechanism_matches_dp_accounting_and_known_value():
    mechanism = [(1.1, 0.01, 1000)]
    epsilon = _ours(mechanism).epsilon(DELTA)
    assert epsilon == pytest.approx(_google(mechanism), rel=1e-6)
    assert epsilon == pytest.approx(1.711770, abs=1e-6)


# Regimes where both libraries' fractional-order RDP series agree; for larger q and small
# sigma dp-accounting's series (summing absolute terms) is looser than Opacus', and both
# stay above the exact PLD epsilon.
@pytest.mark.parametrize(
    "mechanisms",
    [
        [(1.1, 0.01, 1000), (1.5, 0.02, 300)],
        [(1.1, 0.01, 300), (1.3, 0.005, 700), (1.1, 0.01, 200)],
    ],
)
def test_composition_matches_dp_accounting(mechanisms):
    assert _ours(mechanisms).epsilon(DELTA) == pytest.approx(_google(mechanisms), rel=1e-6)


def test_save_load_continues_the_same_epsilon(tmp_path):
    path = tmp_path / "accountant.json"
    first = _ours([(1.1, 0.01, 400), (1.5, 0.02, 100)])
    first.save(path)
    assert not list(tmp_path.glob(".*.tmp"))
    resumed = SiteAccountant.load(path)
    assert resumed.epsilon(DELTA) == first.epsilon(DELTA)
    resumed.record(1.1, 0.01, 600)
    uninterrupted = _ours([(1.1, 0.01, 400), (1.5, 0.02, 100), (1.1, 0.01, 600)])
    assert resumed.epsilon(DELTA) == uninterrupted.epsilon(DELTA)
    assert json.loads(path.read_text())["kind"] == "rdp"


def test_epsilon_if_projects_without_recording():
    accountant = _ours([(1.1, 0.01, 500)])
    spent = accountant.epsilon(DELTA)
    projected = accountant.epsilon_if(DELTA, [(1.1, 0.01, 500), (1.5, 0.02, 300)])
    assert accountant.epsilon(DELTA) == spent < projected
    assert projected == _ours([(1.1, 0.01, 1000), (1.5, 0.02, 300)]).epsilon(DELTA)


def test_prv_is_tighter_than_rdp():
    mechanisms = [(1.1, 0.01, 1000)]
    prv = _ours(mechanisms, "prv").epsilon(DELTA)
    assert 0.8 * _ours(mechanisms).epsilon(DELTA) < prv < _ours(mechanisms).epsilon(DELTA)


def test_edge_cases_and_errors(tmp_path):
    assert SiteAccountant().epsilon(DELTA) == 0.0
    assert _ours([(1.1, 0.01, 0)]).history == []
    assert _ours([(0.0, 0.01, 1)]).epsilon(DELTA) == math.inf  # NOISE_OFF composes too
    with pytest.raises(PrivacyError):
        SiteAccountant().epsilon(0.0)
    with pytest.raises(PrivacyError):
        SiteAccountant().record(-1.0, 0.01, 1)
    with pytest.raises(PrivacyError, match="sample_rate"):
        SiteAccountant().record(1.0, 1.5, 1)
    with pytest.raises(PrivacyError, match="sample_rate"):  # the settings' rule: q > 0
        SiteAccountant().record(1.0, 0.0, 1)
    with pytest.raises(PrivacyError, match="steps"):
        SiteAccountant().record(1.0, 0.1, -1)
    with pytest.raises(PrivacyError):
        SiteAccountant("gdp")  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="prv"):
        SiteAccountant("rdp").load_state_dict(SiteAccountant("prv").state_dict())
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match=r"bad\.json"):
        SiteAccountant.load(tmp_path / "bad.json")


@settings(max_examples=30, deadline=None)
@given(
    sigma=st.floats(0.8, 5.0),
    q=st.floats(1e-4, 0.2),
    a=st.integers(1, 500),
    b=st.integers(1, 500),
)
def test_steps_compose_and_epsilon_grows(sigma, q, a, b):
    split = _ours([(sigma, q, a), (sigma, q, b)])
    assert split.history == [(sigma, q, a + b)]
    assert split.epsilon(DELTA) == _ours([(sigma, q, a + b)]).epsilon(DELTA)
    assert _ours([(sigma, q, a)]).epsilon(DELTA) <= split.epsilon(DELTA)
