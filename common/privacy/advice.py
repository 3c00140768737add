"""A privacy suggestion sized to a site's patients: q, sigma and what they buy; never applied.

busfed never chooses privacy silently: a site states sigma, C and q in its ``site.toml``.
``busfed site init`` and ``busfed site suggest-privacy`` print ``suggest_privacy``'s answer
as a starting point, computed from the site's patient count and the campaign it expects;
nothing here writes a config.

The suggestion, for a campaign of ``rounds * steps_per_round`` DP-SGD steps of each of
``networks`` networks (all on the same patients, so they compose) that must stay within
``epsilon`` at ``delta``:

1. q: ``batch_patients`` expected patients per step, ``q = min(1, batch_patients / patients)``.
   DP-SGD averages the clipped gradients of the ``q * patients`` sampled patients and adds
   noise of std ``sigma * C`` to their sum, so the averaged gradient carries noise of std
   ``sigma * C / (q * patients)``. At a fixed number of steps the sigma a given epsilon
   needs grows about in proportion to q once sigma is past about 1, so larger batches
   leave that ratio unchanged while smaller ones (sigma below 1, where subsampling stops
   amplifying privacy) make it worse: larger batches are better, at the price of compute
   per step (De et al. 2022, "Unlocking high-accuracy differentially private image
   classification through scale"; Sander et al. 2023, "TAN without a burn", who show that
   at a fixed number of steps the outcome follows ``sigma / batch``).
2. sigma: the smallest one (to ``SIGMA_TOLERANCE``) whose steps spend at most ``epsilon``,
   by bisection on the site's own accountant (``SiteAccountant.epsilon_if``), so the
   ledger will record what the suggestion says.
3. the noise on the averaged gradient relative to C, ``sigma / (q * patients)``, and a
   verdict in plain words: above ``SMALL_SITE_NOISE`` the site is small for this campaign.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

from common.errors import UsageError
from common.privacy.accountant import AccountantKind, Mechanism, SiteAccountant

# Expected patients per DP-SGD step when the site has more: the order of the benchmarks'
# sites (q = 0.1 of 488 and 490 patients at BUS-BRA's two GE sites). More costs time per
# step (``benchmarks/dp_step.py``), not privacy: the site may ask for more.
BATCH_PATIENTS = 64
# The bisection stops when sigma is known to within this fraction (the epsilon it reaches
# is then within about 1 % of the target).
SIGMA_TOLERANCE = 5e-3
# A heuristic, not a measurement of this project: above it the noise std on each
# coordinate of the averaged gradient is more than 1/20 of the clip norm. Large-scale DP
# training that matches non-private accuracy runs at ``sigma / batch`` of order 1e-3 (De
# et al. 2022); fine-tuning a pretrained model tolerates more, but 0.05 is where a
# campaign has little signal left to learn from.
SMALL_SITE_NOISE = 0.05
# Beyond this epsilon the guarantee says nothing useful, and the search's sigma tends to 0.
MAX_EPSILON = 100.0


@dataclass(frozen=True, kw_only=True)
class Suggestion:
    """Privacy values for one site and campaign; what the site may adopt, never applied.

    Attributes
    ----------
    patients : int
        The site's training patients (privacy unit = patient).
    epsilon, delta : float
        The target: the whole campaign's epsilon at ``delta``.
    rounds, steps_per_round, networks : int
        The campaign's shape; ``steps`` = their product, the DP-SGD steps composed.
    sample_rate : float
        q, Poisson rate of patients per step.
    noise_multiplier : float
        sigma, the smallest (to ``SIGMA_TOLERANCE``) that keeps the campaign within
        ``epsilon``.
    epsilon_reached : float
        The campaign's epsilon at ``delta`` with this sigma and q (<= ``epsilon``).
    noise_per_mean : float
        ``sigma / (q * patients)``: noise std on the averaged gradient, in units of C.
    small : bool
        ``noise_per_mean`` is above ``SMALL_SITE_NOISE``.
    verdict : str
        The plain-words reading, with what would help when ``small``.
    """

    patients: int
    epsilon: float
    delta: float
    rounds: int
    steps_per_round: int
    networks: int
    sample_rate: float
    noise_multiplier: float
    epsilon_reached: float
    noise_per_mean: float
    small: bool
    verdict: str

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round * self.networks


@functools.cache
def calibrated_sigma(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind = "rdp",
) -> float:
    """The smallest sigma (to ``SIGMA_TOLERANCE``) whose ``steps`` steps at q spend ``epsilon``.

    Epsilon is the site accountant's (``accountant`` kind), as a site's ledger records it.
    An accountant call takes up to about a second, and a search makes about 10.
    """
    site = SiteAccountant(accountant)

    @functools.cache  # the bracketing asks for its last point again
    def spent(sigma: float) -> float:
        return _epsilon(site, delta, [(sigma, sample_rate, steps)])

    low, high = 0.5, 1.0  # bracket: spent(low) > epsilon >= spent(high)
    while spent(high) > epsilon:
        low, high = high, high * 2
    while spent(low) <= epsilon:
        low, high = low / 2, low
    while high - low > SIGMA_TOLERANCE * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return high


def suggest_privacy(
    *,
    patients: int,
    epsilon: float,
    delta: float,
    rounds: int,
    steps_per_round: int,
    networks: int,
    batch_patients: int = BATCH_PATIENTS,
    accountant: AccountantKind = "rdp",
) -> Suggestion:
    """q and sigma for a site of ``patients`` whose campaign stays within (epsilon, delta).

    Parameters
    ----------
    patients : int
        The site's training patients.
    epsilon, delta : float
        The campaign's whole budget: epsilon in (0, ``MAX_EPSILON``], delta in (0, 1).
    rounds, steps_per_round : int
        Federated rounds, and DP-SGD steps per network per round (the site's
        ``max_local_steps`` caps them).
    networks : int
        Networks each round trains on the same patients (2 for WAUVE: detector and
        classifier); their steps compose.
    batch_patients : int
        Expected patients per step; q = min(1, batch_patients / patients).
    accountant : {"rdp", "prv"}
        The site's accountant kind.

    Returns
    -------
    Suggestion

    Raises
    ------
    UsageError
        A value out of range, naming the command-line option that carries it.
    """
    check_campaign(
        patients=patients, epsilon=epsilon, delta=delta, rounds=rounds,
        steps_per_round=steps_per_round, networks=networks, batch_patients=batch_patients,
    )  # fmt: skip
    q = min(1.0, batch_patients / patients)
    steps = rounds * steps_per_round * networks
    sigma = calibrated_sigma(
        epsilon=epsilon, delta=delta, sample_rate=q, steps=steps, accountant=accountant
    )
    reached = _epsilon(SiteAccountant(accountant), delta, [(sigma, q, steps)])
    noise = sigma / (q * patients)
    small = noise > SMALL_SITE_NOISE
    return Suggestion(
        patients=patients, epsilon=epsilon, delta=delta, rounds=rounds,
        steps_per_round=steps_per_round, networks=networks, sample_rate=q,
        noise_multiplier=sigma, epsilon_reached=reached, noise_per_mean=noise, small=small,
        verdict=_verdict(patients=patients, epsilon=epsilon, delta=delta, rounds=rounds,
                         q=q, noise=noise),
    )  # fmt: skip


def _epsilon(site: SiteAccountant, delta: float, extra: list[Mechanism]) -> float:
    with warnings.catch_warnings():
        # Opacus notes when the best RDP order is at the end of its range (q = 1, large
        # sigma): the bound is still valid, only looser, and a search asks many times.
        warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
        return site.epsilon_if(delta, extra)


def check_campaign(**values: float) -> None:
    """Refuse a ``suggest_privacy`` argument out of range, naming its command-line option.

    Raises
    ------
    UsageError
        The first value out of range.
    """
    whole = ("patients", "rounds", "steps_per_round", "networks", "batch_patients")
    options = {"epsilon": "--campaign-epsilon", "rounds": "--campaign-rounds",
               "networks": "--campaign-model"}  # fmt: skip
    for name, value in values.items():
        option = options.get(name, "--" + name.replace("_", "-"))
        if name in whole and (value != int(value) or value < 1):
            raise UsageError(f"{option} must be a whole number >= 1, got {value}")
    epsilon, delta = values["epsilon"], values["delta"]
    if not 0 < epsilon <= MAX_EPSILON:  # also refuses nan
        raise UsageError(f"--campaign-epsilon must be in (0, {MAX_EPSILON:g}], got {epsilon}")
    if not 0 < delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {delta}")


def _verdict(
    *, patients: int, epsilon: float, delta: float, rounds: int, q: float, noise: float
) -> str:
    """Plain words on the suggestion; what would help when the site is small for it."""
    parts = []
    if noise <= SMALL_SITE_NOISE:
        parts.append(
            f"workable: noise on the averaged gradient is {noise:.3f} x C "
            f"(<= {SMALL_SITE_NOISE:g})."
        )
    else:
        # Past sigma ~ 1 the needed sigma grows as q * sqrt(steps) / epsilon, so the noise
        # ratio goes as sqrt(steps) / patients: rough targets, not promises.
        ratio = noise / SMALL_SITE_NOISE
        fewer = math.floor(rounds / ratio**2)
        parts.append(
            f"small site for this campaign: noise on the averaged gradient is {noise:.3f} x C "
            f"(> {SMALL_SITE_NOISE:g}). What would help: about {math.ceil(patients * ratio)} "
            "patients, "
            + (f"or about {fewer} round{'s' * (fewer > 1)} instead of {rounds}, " if fewer else "")
            + f"or a larger epsilon than {epsilon:g}."
        )
    if q == 1:
        parts.append("Every patient is in every step (q = 1): batches cannot grow.")
    if delta > 1 / patients:
        parts.append(
            f"delta {delta:g} is above 1/patients ({1 / patients:.2g}): take delta <= "
            f"1/{patients}, or smaller."
        )
    return " ".join(parts)
