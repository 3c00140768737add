"""The DP-SGD settings of one network, and their one validator, from site.toml to the ledger.

sigma (``noise_multiplier``), C (``max_grad_norm``) and q (``sample_rate``) are stated
per network in the site config (``[privacy.<network>]``), drive its DP-SGD
(``client.dp.run_dp_sgd``), are composed by its accountant and written into every ledger
entry. They travel as one ``DPSettings``; the ledger's flat fields and the accountant's
mechanisms use the same field types, so one rule holds everywhere: sigma > 0, C > 0,
0 < q <= 1, all finite.

The one exception has a name, ``NOISE_OFF``: sigma = 0 turns the noise off and nothing is
private (epsilon is infinite). Only the mechanism's own tests, the empirical audit's power
check and the benchmarks' non-private baselines ask for it, through
``DPSettings.allowing_noise_off`` (the accountant accepts it too, and answers infinity); a
site config and a ledger entry never hold it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)

from common.errors import PrivacyError, validation_problems

# sigma = 0: no noise, no privacy; legal only where asked for by name (see the docstring).
NOISE_OFF = 0.0
# The validation context under which ``NOISE_OFF`` is accepted.
ALLOW_NOISE_OFF = {"allow_noise_off": True}


def _noise_multiplier(value: float, info: ValidationInfo) -> float:
    if value > 0 or (value == NOISE_OFF and (info.context or {}).get("allow_noise_off")):
        return value
    raise ValueError("Input should be greater than 0")


NoiseMultiplier = Annotated[
    float,
    Field(allow_inf_nan=False, description="sigma, noise std / clip norm"),
    AfterValidator(_noise_multiplier),
]
ClipNorm = Annotated[
    float, Field(gt=0, allow_inf_nan=False, description="C, per-patient gradient clip norm")
]
SampleRate = Annotated[float, Field(gt=0, le=1, description="q, Poisson rate of patients per step")]


class DPSettings(BaseModel):
    """Privacy parameters of one network's DP-SGD, privacy unit = patient; keyword-only.

    Attributes
    ----------
    noise_multiplier : float
        sigma: noise std divided by ``max_grad_norm``; > 0 (``NOISE_OFF`` only through
        ``allowing_noise_off``).
    max_grad_norm : float
        C: each patient's gradient is clipped to this L2 norm.
    sample_rate : float
        q: probability that a patient takes part in a step (Poisson sampling).

    Raises
    ------
    pydantic.ValidationError
        Naming every bad value (``load_site_config`` turns it into a ``ConfigError``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: NoiseMultiplier
    max_grad_norm: ClipNorm
    sample_rate: SampleRate

    @classmethod
    def allowing_noise_off(
        cls, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float
    ) -> DPSettings:
        """Settings from loose values (a command line, a test), where sigma may be ``NOISE_OFF``.

        Raises
        ------
        PrivacyError
            Naming every bad value.
        """
        values = {
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": max_grad_norm,
            "sample_rate": sample_rate,
        }
        try:
            return cls.model_validate(values, context=ALLOW_NOISE_OFF)
        except ValidationError as exc:
            raise PrivacyError("; ".join(validation_problems(exc))) from exc
