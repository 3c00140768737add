"""The privacy ledger: signed, hash-chained, append-only lines that a restarted site continues."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError, DataError, PrivacyError, UsageError
from common.keys import (
    create_node_keys,
    create_signing_key,
    load_signing_key,
    load_verify_key,
    signing_key_paths,
)
from common.privacy.accountant import RDP_ORDERS, AccountantKind, SiteAccountant
from common.privacy.ledger import (
    GENESIS_HASH,
    LEDGER_FILE,
    LedgerEntry,
    PrivacyLedger,
    canonical_json,
    line_hash,
    signature_valid,
)
from common.privacy.settings import DPSettings
from deploy.audit.verify import verify_ledger

DELTA = 1e-5
# Rounds 1-2 fit (epsilon 4.62 after round 2); round 3 would reach 5.52 and is refused.
BUDGET = 5.0
STEPS = 3
N_PATIENTS = 40
MODELS = {
    "detector": DPSettings(noise_multiplier=1.5, max_grad_norm=1.0, sample_rate=0.3),
    "classifier": DPSettings(noise_multiplier=1.3, max_grad_norm=0.5, sample_rate=0.25),
}
FIELDS = {
    "site", "run_id", "round", "model", "privacy_unit", "n_units", "sample_rate",
    "noise_multiplier", "max_grad_norm", "steps", "delta", "accountant", "epsilon_round",
    "epsilon_total", "budget", "status", "time", "prev_hash", "signature", "noise_source",
}  # fmt: skip


@dataclass
class SimulatedSite:
    """What ``client/site.py`` does with its accountant and ledger in ``fit``, minus training.

    Each call of ``run_round`` builds fresh ``SiteAccountant`` and ``PrivacyLedger`` objects
    from the files, as a new ClientApp process does.
    """

    name: str
    state: Path
    keys: Path
    accountant_kind: AccountantKind = "rdp"
    budget: float = BUDGET

    @property
    def ledger_path(self) -> Path:
        return self.state / LEDGER_FILE

    @property
    def accountant_path(self) -> Path:
        return self.state / "accountant.json"

    def ledger(self) -> PrivacyLedger:
        key = load_signing_key(signing_key_paths(self.keys, site=self.name)[0])
        return PrivacyLedger(self.ledger_path, site=self.name, signing_key=key)

    def accountant(self) -> SiteAccountant:
        if self.accountant_path.exists():
            return SiteAccountant.load(self.accountant_path)
        return SiteAccountant(self.accountant_kind)

    def run_round(
        self,
        run_id: str,
        round_: int,
        *,
        ledger: PrivacyLedger | None = None,
        accountant: SiteAccountant | None = None,
    ) -> str:
        ledger = ledger or self.ledger()
        accountant = accountant or self.accountant()
        plan = [(m.noise_multiplier, m.sample_rate, STEPS) for m in MODELS.values()]
        refused = accountant.epsilon_if(DELTA, plan) > self.budget
        for model, dp in MODELS.items():
            if refused:
                steps, epsilon_round = 0, 0.0
            else:
                steps = STEPS
                accountant.record(dp.noise_multiplier, dp.sample_rate, steps)
                accountant.save(self.accountant_path)
                epsilon_round = SiteAccountant(accountant.kind).epsilon_if(
                    DELTA, [(dp.noise_multiplier, dp.sample_rate, steps)]
                )
            ledger.append(
                run_id=run_id, round=round_, model=model, privacy_unit="patient",
                n_units=N_PATIENTS, dp=dp, steps=steps, delta=DELTA, accountant=accountant.kind,
                epsilon_round=epsilon_round, epsilon_total=accountant.epsilon(DELTA),
                budget=self.budget, status="refused" if refused else "trained",
                noise_source="chacha20-csprng",
            )  # fmt: skip
        return "refused" if refused else "trained"


def make_site(root: Path, name: str = "site-a", **kwargs: Any) -> SimulatedSite:
    """A site with its ledger key in ``root/keys`` and an empty state folder."""
    keys = root / "keys"
    create_signing_key(keys, site=name)
    state = root / name / "state"
    state.mkdir(parents=True)
    return SimulatedSite(name, state, keys, **kwargs)


def simulate(site: SimulatedSite, rounds: int = 3, run_id: str = "run-1") -> list[str]:
    return [site.run_round(run_id, r) for r in range(1, rounds + 1)]


def copy_site(site: SimulatedSite, root: Path) -> SimulatedSite:
    """The same site, keys and state copied under ``root``, to tamper with or continue."""
    shutil.copytree(site.keys, root / "keys")
    shutil.copytree(site.state, root / site.name / "state")
    return SimulatedSite(site.name, root / site.name / "state", root / "keys",
                         site.accountant_kind, site.budget)  # fmt: skip


def refusal(last: LedgerEntry, round_: int, model: str) -> dict[str, Any]:
    """``append`` fields of a refusal after ``last``: it spends nothing, so needs no accounting."""
    return dict(
        run_id=last.run_id, round=round_, model=model, privacy_unit="patient",
        n_units=N_PATIENTS, dp=MODELS[model], steps=0, delta=DELTA, accountant=last.accountant,
        epsilon_round=0.0, epsilon_total=last.epsilon_total, budget=last.budget,
        status="refused", noise_source="chacha20-csprng",
    )  # fmt: skip


def refuse(site: SimulatedSite, round_: int, ledger: PrivacyLedger | None = None) -> None:
    """Append the refusals of one round."""
    ledger = ledger or site.ledger()
    for model in MODELS:
        last = ledger.last()
        assert last is not None
        ledger.append(**refusal(last, round_, model))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> SimulatedSite:
    """Three rounds of a site with two models: rounds 1-2 trained, round 3 refused."""
    site = make_site(tmp_path_factory.mktemp("simulated"))
    assert simulate(site) == ["trained", "trained", "refused"]
    return site


def test_a_site_writes_signed_chained_canonical_lines(simulated):
    lines = simulated.ledger_path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert len(lines) == 6
    public = load_verify_key(signing_key_paths(simulated.keys, site=simulated.name)[1])
    prev = GENESIS_HASH
    for line in lines:
        fields = json.loads(line)
        assert set(fields) == FIELDS
        assert canonical_json(fields) == line
        assert fields["prev_hash"] == prev
        assert signature_valid(fields, public)
        prev = line_hash(line)
    assert simulated.ledger().last() == LedgerEntry.model_validate_json(lines[-1])


def test_epsilons_compose_and_a_refusal_spends_nothing(simulated):
    entries = simulated.ledger().entries()
    totals = [e.epsilon_total for e in entries]
    assert totals == sorted(totals)
    trained = entries[:4]
    assert [(e.round, e.model, e.status) for e in trained] == [
        (1, "detector", "trained"),
        (1, "classifier", "trained"),
        (2, "detector", "trained"),
        (2, "classifier", "trained"),
    ]
    assert all(e.steps == STEPS and e.epsilon_round > 0 for e in trained)
    # Composition, checked against dp-accounting directly: the site's figure is never below
    # an auditor's independent recomputation, and within 0.1% of it at these settings.
    for entry, rounds in ((trained[1], 1), (trained[-1], 2)):
        reference = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
        for _ in range(rounds):
            for m in MODELS.values():
                event = dp_accounting.PoissonSampledDpEvent(
                    m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
                )
                reference.compose(dp_accounting.SelfComposedDpEvent(event, STEPS))
        expected = reference.get_epsilon(DELTA)
        assert expected <= entry.epsilon_total == pytest.approx(expected, rel=1e-3)
    assert trained[-1].epsilon_total < BUDGET
    for e in entries[4:]:
        assert (e.round, e.status, e.steps, e.epsilon_round) == (3, "refused", 0, 0)
        assert e.epsilon_total == trained[-1].epsilon_total


def test_a_restarted_site_continues_its_chain_and_epsilon(simulated, tmp_path):
    site = make_site(tmp_path)
    ledger, accountant = site.ledger(), site.accountant()
    site.run_round("run-1", 1, ledger=ledger, accountant=accountant)
    del ledger, accountant  # the process dies; the files stay
    ledger, accountant = site.ledger(), SiteAccountant.load(site.accountant_path)
    for r in (2, 3):
        site.run_round("run-1", r, ledger=ledger, accountant=accountant)

    assert [e.epsilon_total for e in site.ledger().entries()] == [
        e.epsilon_total for e in simulated.ledger().entries()
    ]
    verdict = verify_ledger(site.ledger_path, site.keys)
    assert verdict.ok, verdict.problem
    assert len(verdict.entries) == 6


def test_two_ledger_objects_on_one_file_keep_one_chain(simulated, tmp_path):
    site = copy_site(simulated, tmp_path)
    first, second = site.ledger(), site.ledger()
    refuse(site, 4, first)
    refuse(site, 5, second)
    assert len(first.entries()) == 10
    assert verify_ledger(site.ledger_path, site.keys).ok


def test_a_torn_last_line_stops_appends_until_a_person_repairs_it(simulated, tmp_path):
    site = copy_site(simulated, tmp_path)
    opened_before_the_crash = site.ledger()
    last = opened_before_the_crash.last()
    assert last is not None
    complete = site.ledger_path.read_bytes()
    torn_line = canonical_json({"site": site.name, "run_id": "run-1", "round": 3})
    site.ledger_path.write_bytes(complete + torn_line[:40])  # a crash mid-write

    with pytest.raises(
        DataError,
        match=rf"{LEDGER_FILE}: the last line \(from byte {len(complete)}\) is incomplete",
    ):
        site.ledger()
    with pytest.raises(DataError, match="incomplete"):
        opened_before_the_crash.append(**refusal(last, 4, "detector"))
    assert site.ledger_path.read_bytes() == complete + torn_line[:40]  # nothing appended
    with pytest.raises(DataError, match=rf"{LEDGER_FILE}:7: not a ledger entry"):
        opened_before_the_crash.entries()

    # The documented repair: truncate to the byte the error names; the chain then goes on.
    os.truncate(site.ledger_path, len(complete))
    refuse(site, 4)
    assert verify_ledger(site.ledger_path, site.keys).ok


def test_a_last_line_that_is_not_an_entry_stops_appends(simulated, tmp_path):
    site = copy_site(simulated, tmp_path)
    with site.ledger_path.open("ab") as f:
        f.write(b"\x00" * 32 + b"\n")  # what a power loss can leave on some file systems
    with pytest.raises(DataError, match=r"last line \(from byte \d+\) is not a ledger entry"):
        site.ledger()


def test_invalid_entries_are_refused_and_nothing_is_written(simulated, tmp_path):
    site = copy_site(simulated, tmp_path)
    before = site.ledger_path.read_bytes()
    good = site.ledger().last()
    assert good is not None
    fields = good.unsigned()
    for key in ("site", "time", "prev_hash"):
        del fields[key]
    fields["dp"] = DPSettings(**{k: fields.pop(k) for k in DPSettings.model_fields})
    # The entry checks sigma, C and q by the settings' rule even if they skipped it.
    unchecked = DPSettings.model_construct(noise_multiplier=1.5, max_grad_norm=1.0, sample_rate=0)
    for bad in ({"dp": unchecked}, {"status": "trained"}, {"epsilon_total": float("inf")}):
        with pytest.raises(PrivacyError, match="ledger entry refused"):
            site.ledger().append(**{**fields, "round": 4, **bad})
    assert site.ledger_path.read_bytes() == before


def test_a_ledger_belongs_to_one_site(simulated, tmp_path):
    other_key = load_signing_key(create_signing_key(tmp_path, site="site-b")[0])
    with pytest.raises(DataError, match="a ledger of site 'site-a', not 'site-b'"):
        PrivacyLedger(simulated.ledger_path, site="site-b", signing_key=other_key)


def test_signing_keys_are_private_and_never_replaced(tmp_path):
    private, public = create_signing_key(tmp_path / "keys", site="site-a")
    assert (private.name, public.name) == ("site-a.ledger.key", "site-a.ledger.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signing = load_signing_key(private)
    assert signing.public_key() == load_verify_key(public)
    before = private.read_bytes()
    with pytest.raises(UsageError, match=r"site-a\.ledger\.pub: already exists"):
        create_signing_key(tmp_path / "keys", site="site-a")
    public.unlink()
    with pytest.raises(UsageError, match=r"site-a\.ledger\.key: already exists"):
        create_signing_key(tmp_path / "keys", site="site-a")
    assert private.read_bytes() == before


def test_key_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.ledger\.key: ledger signing key not found"):
        load_signing_key(tmp_path / "nope.ledger.key")
    node = create_node_keys(tmp_path / "keys", site="site-a")
    with pytest.raises(ConfigError, match=r"site-a\.pub: not a readable PEM public key"):
        load_verify_key(node.public_key)
    ecdsa = tmp_path / "ecdsa.key"
    ecdsa.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match=r"ecdsa\.key: not an Ed25519 key"):
        load_signing_key(ecdsa)
