"""How every busfed command reports a ``BusfedError``: its message on stderr, its exit code.

One place, so that ``busfed``, its sub-apps mounted or run standalone (tests use Typer's
CliRunner on each), and ``busfed site`` all behave alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from common.errors import BusfedError

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def exit_codes() -> Iterator[None]:
    """Turn a ``BusfedError`` raised inside into its message and ``typer.Exit(exit_code)``."""
    try:
        yield
    except BusfedError as error:
        Console(stderr=True, highlight=False).print(
            f"[red]error:[/red] {escape(str(error))}", soft_wrap=True
        )
        raise typer.Exit(code=error.exit_code) from error


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """``command`` run inside ``exit_codes``: for Typer command functions."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with exit_codes():
            return command(*args, **kwargs)

    return wrapper
