"""One error hierarchy for busfed; every CLI exit code is defined here and documented.

The exit code of a ``BusfedError`` is what the ``busfed`` command returns when it stops
on that error. ``EXIT_CODES`` is the table the README and ``busfed --help`` show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "a check failed (validation found bad rows, a verification failed)",
    2: "bad usage: a missing or malformed argument, option or config file",
    3: "input data unreadable: missing, corrupt or unsupported video or manifest",
    4: "privacy: the site's budget would be exceeded or a privacy setting is invalid",
    5: "federation: a Flower process failed to start, connect or finish",
    6: "tracking: MLflow could not record a run or register a model",
}


class BusfedError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(BusfedError):
    exit_code = 2


class ConfigError(UsageError):
    """A config file is missing, unreadable or fails its schema."""


class DataError(BusfedError):
    """Input data (video, manifest, boxes) is missing, corrupt or unsupported."""

    exit_code = 3


class ValidationFailed(BusfedError):
    """A dataset has bad rows; ``problems`` lists each one."""

    exit_code = 1


class PrivacyError(BusfedError):
    exit_code = 4


class BudgetExceeded(PrivacyError):
    """Training this round would take the site past its epsilon budget."""


class FederationError(BusfedError):
    exit_code = 5


class TrackingError(BusfedError):
    exit_code = 6


def validation_problems(
    exc: ValidationError,
    *,
    whole: str = "entry",
    name: Callable[[tuple[str | int, ...]], str] | None = None,
) -> list[str]:
    """Each problem pydantic found, once, as ``field: message``.

    ``name`` turns an error's location into what the user knows it as (a CLI option, a CSV
    column); by default the dotted path, or ``whole`` when the error is about the whole
    object.
    """
    problems: dict[str, None] = {}
    for err in exc.errors(include_url=False):
        where = name(err["loc"]) if name else ".".join(map(str, err["loc"])) or whole
        problems[f"{where}: {err['msg'].removeprefix('Value error, ')}"] = None
    return list(problems)
