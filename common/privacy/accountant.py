"""A site's privacy ledger arithmetic: every DP-SGD mechanism it ran, composed.

Each mechanism is a Poisson-subsampled Gaussian with privacy unit = patient: noise
multiplier sigma, patient sampling rate q, and a number of steps. One site composes all of
them (detector and classifier, every round) into one epsilon at a given delta.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import DataError, PrivacyError, validation_problems
from common.files import write_atomic
from common.privacy.settings import ALLOW_NOISE_OFF, NoiseMultiplier, SampleRate

# Where a site saves its accountant, in its state folder.
ACCOUNTANT_FILE = "accountant.json"
AccountantKind = Literal["rdp", "prv"]
Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

# dp-accounting's default RDP orders. Opacus' stop at 63, which overstates epsilon when
# sigma is large and q small (the best order is then above 63).
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]

KINDS = ("rdp", "prv")


class SiteAccountant:
    """Composes the site's Poisson-subsampled Gaussian mechanisms with Opacus.

    Parameters
    ----------
    kind : {"rdp", "prv"}
        Opacus' ``RDPAccountant`` (default) or ``PRVAccountant`` (tighter, numerical;
        returns its upper bound). The RDP epsilon is the larger of Opacus' and Google's
        dp-accounting ``RdpAccountant`` bounds (they differ at large q and small sigma,
        where dp-accounting's fractional-order series is looser); both stay above the
        exact (PLD) epsilon.
    """

    def __init__(self, kind: AccountantKind = "rdp") -> None:
        if kind not in KINDS:
            raise PrivacyError(f"unknown accountant {kind!r}; known: {', '.join(KINDS)}")
        self.kind: AccountantKind = kind
        self.history: list[Mechanism] = []

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` steps of DP-SGD with the given noise multiplier and sampling rate."""
        self.history = _compose(self.history, [(noise_multiplier, sample_rate, steps)])

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``; 0.0 before any step, inf with zero noise."""
        return _epsilon(self.kind, self.history, delta)

    def epsilon_if(self, delta: float, extra: list[Mechanism]) -> float:
        """Epsilon at ``delta`` if the mechanisms ``extra`` ran too (nothing is recorded).

        ``extra`` holds ``(noise_multiplier, sample_rate, steps)`` tuples: the planned
        training, for a budget check before it starts.
        """
        return _epsilon(self.kind, _compose(self.history, extra), delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: the accountant kind and the composed mechanisms."""
        return {"kind": self.kind, "history": [list(m) for m in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accountant's history with ``state`` (from ``state_dict``)."""
        if state.get("kind") != self.kind:
            raise PrivacyError(
                f"cannot load a {state.get('kind')!r} accountant state into a {self.kind!r} one"
            )
        self.history = _compose([], [tuple(m) for m in state["history"]])

    def save(self, path: Path) -> None:
        """Write ``state_dict`` as JSON atomically (a reader never sees half a file)."""
        write_atomic(Path(path), json.dumps(self.state_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> SiteAccountant:
        """Read an accountant written by ``save``."""
        path = Path(path)
        try:
            state = json.loads(path.read_text())
            accountant = cls(state["kind"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a saved accountant: {exc}") from exc
        accountant.load_state_dict(state)
        return accountant


class _Mechanism(BaseModel):
    """One (sigma, q, steps) to compose, checked by the rule of ``DPSettings``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: NoiseMultiplier
    sample_rate: SampleRate
    steps: int = Field(ge=0, strict=False)


def _compose(history: list[Mechanism], extra: list[Mechanism]) -> list[Mechanism]:
    """History with ``extra`` appended, merging runs of the same (sigma, q) as Opacus does."""
    out = list(history)
    for noise_multiplier, sample_rate, steps in extra:
        values = {"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps}
        try:
            # The settings' own rule; NOISE_OFF is composed too (epsilon is then infinite).
            checked = _Mechanism.model_validate(values, context=ALLOW_NOISE_OFF)
        except ValidationError as exc:
            raise PrivacyError("; ".join(validation_problems(exc))) from exc
        if checked.steps == 0:
            continue  # touches no patient's data
        mechanism = (checked.noise_multiplier, checked.sample_rate, checked.steps)
        if out and out[-1][:2] == mechanism[:2]:
            out[-1] = (*mechanism[:2], out[-1][2] + mechanism[2])
        else:
            out.append(mechanism)
    return out


def _dp_accounting_rdp_epsilon(history: list[Mechanism], delta: float) -> float:
    import dp_accounting  # here, not at the top: the CLI's help must not load it
    from absl import logging as absl_logging

    # dp-accounting warns on every composition about the fractional orders it drops at
    # large q; the drop is by design (the bound stays valid): spare the site's log.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        accountant = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
        for noise, q, steps in history:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise))
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logging.set_verbosity(verbosity)


def _epsilon(kind: str, history: list[Mechanism], delta: float) -> float:
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    if not history:
        return 0.0
    if any(noise == 0 for noise, _, _ in history):
        return math.inf
    # Opacus loads torch (seconds): imported by the accounting, not by whoever imports this.
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        rdp = RDPAccountant()
        rdp.history = list(history)
        opacus_epsilon = float(rdp.get_epsilon(delta=delta, alphas=RDP_ORDERS))
        # Two valid RDP bounds: Opacus sums the fractional-order series with signs,
        # dp-accounting (what an auditor recomputes with) in absolute value, so at large q
        # and many steps dp-accounting's is up to a few % higher. The site reports the
        # larger: it never understates what an independent recomputation finds.
        return max(opacus_epsilon, _dp_accounting_rdp_epsilon(history, delta))
    prv = PRVAccountant()
    prv.history = list(history)
    return float(prv.get_epsilon(delta=delta))
