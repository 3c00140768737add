"""The consortium folder's append-only logs: read them validated, append to them durably.

``enrolments.jsonl`` (``deploy.federation.enrolment``) and ``launches.jsonl``
(``deploy.federation.runs``) are the lead's only record of which site holds which node and
key and which run belongs to which campaign; one JSON object a line, never rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from common.errors import ConfigError, validation_problems

_Line = TypeVar("_Line", bound=BaseModel)


def read_jsonl(path: Path, model: type[_Line]) -> list[_Line]:
    """An append-only JSON-lines log, validated line by line ([] if it does not exist).

    Raises
    ------
    ConfigError
        Naming the file, the 1-based line and the field of the first bad line.
    """
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as exc:
            problem = "; ".join(validation_problems(exc, whole="line"))
            raise ConfigError(f"{path}, line {number}: {problem}") from exc
    return records


def append_line(path: Path, line: str) -> None:
    """Append one line and make it durable: the logs are the lead's only record."""
    with path.open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
