"""The one-run empirical privacy audit: its lower bound on epsilon and its result record.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846). m canaries are each included in the training data independently with
probability 1/2; after one training run the auditor guesses "in" for the r+ highest
membership scores and "out" for the r- lowest, abstaining on the rest. If the training is
(epsilon, delta)-DP, the number v of correct guesses among the r = r+ + r- made is, up to a
delta term, stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) (their main
theorem). A v too large for that at significance p = 1 - confidence refutes epsilon;
``epsilon_lower_bound`` is the largest epsilon so refuted. The two functions below are the
paper's reference code.

A lower bound: the true epsilon of the training is at least it, with the stated confidence.
One-run audits are loose (far below the accountant's epsilon even for a tight mechanism),
so a bound under the claimed epsilon is no proof of privacy; one over it shows that the
training leaks more than its accounting says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import PrivacyError, UsageError, validation_problems
from common.privacy.ledger import NoiseSource
from common.privacy.settings import NOISE_OFF, ClipNorm, SampleRate

# The paper's binary search: 30 halvings after the bracket is found.
BISECTION_STEPS = 30
# Of m canaries, this share is guessed "in" (highest scores) and as many "out" (lowest).
# Fixed in advance, never searched over, so the p-value needs no multiple-testing correction.
GUESS_FRACTION = 0.4


def guesses_per_side(m: int) -> int:
    """r+ = r-: the guesses "in" (and as many "out") made on m canaries."""
    return int(GUESS_FRACTION * m)


def audit_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of "the training is (epsilon, delta)-DP" given v correct guesses out of r.

    ``p_value_DP_audit`` of the paper's reference code (Steinke et al. 2023):
    beta + alpha * delta * 2m, capped at 1, where q = e^eps / (1 + e^eps) is the accuracy
    of eps-DP randomized response, beta = P[Binomial(r, q) >= v] and
    alpha = max over i in 1..v of P[v > Binomial(r, q) >= v - i] / i (0 if v = 0). The
    reference loop over i is written here as a cumulative sum; it is the same maximum.
    """
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise PrivacyError(f"epsilon must be finite and >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise PrivacyError(f"delta must be in [0, 1], got {delta}")
    from scipy.stats import binom  # half a second to import: not for the CLI's help

    q = 1 / (1 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))
    alpha = 0.0
    if v > 0:
        i = np.arange(1, v + 1)
        alpha = max(0.0, float(np.max(np.cumsum(binom.pmf(v - i, r, q)) / i)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon refuted at significance 1 - ``confidence`` (0 if none is).

    ``get_eps_audit`` of the paper's reference code: grow an integer bracket until the
    p-value reaches p = 1 - confidence, then bisect 30 times, keeping the refuted end.

    Parameters
    ----------
    m : int
        Canaries (each included with probability 1/2).
    r : int
        Guesses made (r+ "in" and r- "out"), r <= m.
    v : int
        Correct guesses, v <= r.
    delta : float
        The delta at which epsilon is bounded.
    confidence : float
        In (0, 1), e.g. 0.95.

    With delta = 0 and every guess right (v = r) the p-value is q^r, so the bound is
    log(q / (1 - q)) with q = p^(1 / r): r guesses can never show more than that.
    """
    if not 0 < confidence < 1:
        raise PrivacyError(f"confidence must be in (0, 1), got {confidence}")
    p = 1 - confidence

    def refuted(epsilon: float) -> bool:
        return audit_p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) < p

    low, high = 0.0, 1.0
    while refuted(high):
        high += 1
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if refuted(middle):
            low = middle
        else:
            high = middle
    return low


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmpiricalAudit(_Strict):
    """What ``busfed audit empirical`` found: ``empirical.json``.

    ``epsilon_claimed`` is the accountant's epsilon at ``delta`` of exactly the audited
    run (sigma, q, steps); None when the noise was off (no finite claim: the power check).
    """

    privacy_unit: Literal["patient"] = "patient"
    model: str = Field(description="the network trained, e.g. 'keyframe (tiny preset)'")
    n_patients: int = Field(ge=0, description="the rehearsal site's patients, canaries apart")
    canaries: int = Field(ge=1, description="m: canary patients, each in with probability 1/2")
    canaries_in: int = Field(ge=0, description="canaries the coins put in the training data")
    guesses_in: int = Field(ge=0, description="r+: highest scores guessed 'in'")
    guesses_out: int = Field(ge=0, description="r-: lowest scores guessed 'out'")
    guesses: int = Field(ge=0, description="r = r+ + r-")
    correct: int = Field(ge=0, description="v: correct guesses")
    delta: float = Field(gt=0, lt=1)
    confidence: float = Field(gt=0, lt=1)
    epsilon_lower_bound: float = Field(ge=0)
    epsilon_claimed: float | None = Field(ge=0)
    accountant: Literal["rdp", "prv"]
    # The settings' rule; sigma may also be NOISE_OFF here, the record of a power check.
    noise_multiplier: float = Field(ge=NOISE_OFF)
    max_grad_norm: ClipNorm
    sample_rate: SampleRate
    steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    noise_source: NoiseSource = Field(description="the randomness of the noise and sampling")
    seed: int
    seconds: float = Field(ge=0)

    @property
    def consistent(self) -> bool:
        """The empirical bound does not exceed the claimed epsilon (always, with no claim)."""
        return self.epsilon_claimed is None or self.epsilon_lower_bound <= self.epsilon_claimed

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def load_empirical(path: Path) -> EmpiricalAudit:
    """Read an ``empirical.json`` written by ``busfed audit empirical``.

    Raises
    ------
    UsageError
        The file is missing or not such a record (every bad field is named).
    """
    try:
        return EmpiricalAudit.model_validate_json(path.read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: no such empirical audit file") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from exc
    except ValidationError as exc:
        errors = "; ".join(validation_problems(exc, whole="file"))
        raise UsageError(f"{path}: not an empirical audit result: {errors}") from exc
