"""The site's privacy budget at work: the guards before a round, the record after it.

``SiteBudget`` is built from the site's own config (``[privacy]``: budget, delta,
accountant, and sigma, C, q per network as ``DPSettings``); the server proposes, the site
decides. Per round it

1. refuses a server proposal weaker than the site's settings (``check_proposal``);
2. tells whether the round was already trained (``trained``), and refuses to train it
   twice (``refuse_twice``);
3. refuses a round that would take the site past its budget, with a signed ``refused``
   ledger entry per network (``guard``);
4. after training, composes what ran into the site's one accountant, saves it, and appends
   a signed ``trained`` ledger entry per network (``spend``).

Every refusal of a round is logged in the site's activity log (``fit-refused``) before it
is raised.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn, Protocol

from flwr.common import Scalar

from client.dp import INSECURE_NOISE, SECURE_NOISE
from common.config import SiteConfig
from common.errors import BudgetExceeded, BusfedError, PrivacyError
from common.keys import load_signing_key, signing_key_paths
from common.privacy.accountant import ACCOUNTANT_FILE, SiteAccountant
from common.privacy.ledger import LEDGER_FILE, LedgerEntry, NoiseSource, PrivacyLedger
from common.privacy.settings import DPSettings

if TYPE_CHECKING:
    from client.dp import MechanismRecord


class EventLog(Protocol):
    """The site's activity log (``SiteClient.event``)."""

    def __call__(self, name: str, **fields: object) -> None: ...


@dataclass(frozen=True, kw_only=True)
class Proposal:
    """What the server's run config proposes for sigma and q; 0 means no proposal."""

    noise_multiplier: float
    sample_rate: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Scalar]) -> Proposal:
        return cls(
            noise_multiplier=float(run_config.get("proposed-noise-multiplier", 0.0)),
            sample_rate=float(run_config.get("proposed-sample-rate", 0.0)),
        )


@dataclass(frozen=True, kw_only=True)
class RoundId:
    """One round of one campaign: what the ledger and the duplicate guard key on."""

    run_id: str  # the campaign: it outlives a restarted server, each restart a new Flower run
    round: int
    initial_model: str | None = None  # fingerprint of the campaign's starting model

    @classmethod
    def from_fit_config(cls, config: Mapping[str, Scalar]) -> RoundId:
        return cls(
            run_id=str(config.get("campaign") or config.get("run_id", "unknown")),
            round=int(config.get("round", 0)),
            initial_model=str(config["initial-model"]) if config.get("initial-model") else None,
        )


class SiteBudget:
    """The guards, the accountant and the ledger of one site for one round.

    Parameters
    ----------
    config : SiteConfig
        The site's config; its ``privacy`` section owns every privacy value.
    networks : sequence of str
        The networks the round trains (the chosen bundle's ``network_names``).
    log : EventLog
        Where refusals are logged.

    Raises
    ------
    ConfigError
        The site config has no ``[privacy.<network>]`` section for one of ``networks``.
    """

    def __init__(self, config: SiteConfig, *, networks: Sequence[str], log: EventLog) -> None:
        self.site = config.site
        self.privacy = config.privacy
        self.settings: dict[str, DPSettings] = {name: self.privacy.of(name) for name in networks}
        self.accountant_path = self.site.state / ACCOUNTANT_FILE
        self.log = log

    @functools.cached_property
    def ledger(self) -> PrivacyLedger:
        self.site.state.mkdir(parents=True, exist_ok=True)
        key_path, _ = signing_key_paths(self.site.keys, site=self.site.name)
        return PrivacyLedger(
            self.site.state / LEDGER_FILE,
            site=self.site.name,
            signing_key=load_signing_key(key_path),
        )

    @functools.cached_property
    def accountant(self) -> SiteAccountant:
        """Everything the site has spent, over all networks and rounds."""
        if self.accountant_path.exists():
            return SiteAccountant.load(self.accountant_path)
        return SiteAccountant(kind=self.privacy.accountant)

    @property
    def epsilon(self) -> float:
        """The site's composed epsilon at its delta."""
        return self.accountant.epsilon(self.privacy.delta)

    def refuse(self, server_round: int, error: BusfedError) -> NoReturn:
        """Log the refusal of ``server_round`` in the activity log, then raise ``error``."""
        self.log("fit-refused", round=server_round, reason=str(error))
        raise error

    def check_proposal(self, proposal: Proposal) -> None:
        """The site's privacy settings win; a server proposal weaker than them is refused.

        Less noise or a higher patient sampling rate than the site's would spend more of its
        budget per step than the hospital agreed to; stronger proposals change nothing
        (the site trains with its own values either way).
        """
        for dp in self.settings.values():
            if 0 < proposal.noise_multiplier < dp.noise_multiplier:
                raise PrivacyError(
                    f"site {self.site.name} refuses: the server proposes noise multiplier "
                    f"{proposal.noise_multiplier}, weaker than the site's {dp.noise_multiplier}"
                )
            if proposal.sample_rate > dp.sample_rate:
                raise PrivacyError(
                    f"site {self.site.name} refuses: the server proposes sample rate "
                    f"{proposal.sample_rate}, weaker than the site's {dp.sample_rate}"
                )

    def trained(self, round_id: RoundId) -> bool:
        """Whether the ledger holds a trained entry of this round of this campaign."""
        return any(
            e.run_id == round_id.run_id and e.round == round_id.round and e.status == "trained"
            for e in self.ledger.entries()
        )

    def refuse_twice(self, round_id: RoundId) -> NoReturn:
        """Refuse a trained round asked for again from another global model."""
        self.refuse(
            round_id.round,
            PrivacyError(
                f"site {self.site.name} already trained round {round_id.round} of campaign "
                f"{round_id.run_id} from another global model; it will not spend epsilon on "
                "it twice"
            ),
        )

    def guard(self, round_id: RoundId, *, n_units: int, steps: int) -> None:
        """Refuse, with a ``refused`` ledger entry per network, a round past the budget.

        Raises
        ------
        BudgetExceeded
            ``steps`` steps of every network would take the site's epsilon past its budget.
        """
        privacy = self.privacy
        projected = self.accountant.epsilon_if(
            privacy.delta,
            [(dp.noise_multiplier, dp.sample_rate, steps) for dp in self.settings.values()],
        )
        if projected <= privacy.epsilon_budget:
            return
        spent = self.epsilon
        for model, dp in self.settings.items():
            self._append(
                round_id, model=model, dp=dp, n_units=n_units, steps=0, epsilon_round=0.0,
                epsilon_total=spent, status="refused",
            )  # fmt: skip
        self.refuse(
            round_id.round,
            BudgetExceeded(
                f"site {self.site.name} refuses round {round_id.round}: epsilon would reach "
                f"{projected:.3f} > budget {privacy.epsilon_budget} at delta {privacy.delta}"
            ),
        )

    def spend(
        self, round_id: RoundId, records: Mapping[str, MechanismRecord], *, n_units: int
    ) -> list[LedgerEntry]:
        """Compose what each network ran, save the accountant, append a ``trained`` entry each."""
        delta, entries = self.privacy.delta, []
        for model, rec in records.items():
            alone = SiteAccountant(self.privacy.accountant)
            alone.record(rec.dp.noise_multiplier, rec.dp.sample_rate, rec.steps)
            self.accountant.record(rec.dp.noise_multiplier, rec.dp.sample_rate, rec.steps)
            # The spend is saved before it is logged: a crash between the two overstates,
            # never understates, what the site has spent.
            self.accountant.save(self.accountant_path)
            entry = self._append(
                round_id, model=model, dp=rec.dp, n_units=n_units, steps=rec.steps,
                epsilon_round=alone.epsilon(delta), epsilon_total=self.epsilon,
                status="trained", noise_source=rec.noise_source,
            )  # fmt: skip
            entries.append(entry)
        return entries

    def _append(
        self,
        round_id: RoundId,
        *,
        model: str,
        dp: DPSettings,
        n_units: int,
        steps: int,
        epsilon_round: float,
        epsilon_total: float,
        status: Literal["trained", "refused"],
        noise_source: NoiseSource | None = None,
    ) -> LedgerEntry:
        """One signed entry; ``noise_source`` defaults to the site's setting (a refusal)."""
        privacy = self.privacy
        if noise_source is None:
            noise_source = SECURE_NOISE if privacy.secure_rng else INSECURE_NOISE
        return self.ledger.append(
            run_id=round_id.run_id, round=round_id.round, model=model,
            privacy_unit=privacy.privacy_unit, n_units=n_units, dp=dp, steps=steps,
            delta=privacy.delta, accountant=privacy.accountant, epsilon_round=epsilon_round,
            epsilon_total=epsilon_total, budget=privacy.epsilon_budget, status=status,
            noise_source=noise_source, initial_model=round_id.initial_model,
        )  # fmt: skip
