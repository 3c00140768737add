"""``busfed audit empirical``: the one-run empirical privacy audit on a rehearsal site.

``empirical_command`` is the command; ``deploy.audit.cli`` mounts it on the ``audit`` group.
The work is in ``deploy.audit.empirical``, which trains with the sites' code (``client/``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, cast

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from common.cli import reports_errors
from common.config import load_site_config
from common.errors import PrivacyError, UsageError, ValidationFailed
from common.privacy.accountant import KINDS
from common.privacy.empirical import GUESS_FRACTION, EmpiricalAudit

RESULT_FILE = "empirical.json"
SAMPLED_PER_CANARY = 5  # default steps: an included canary is drawn 5 times on average

EMPIRICAL_HELP = (
    "Empirical lower bound on the epsilon of the sites' DP-SGD, from one training run with "
    "canaries (Steinke, Nasr and Jagielski 2023), next to the accountant's epsilon of that "
    "run.\n\n"
    "M canary patients (one random-noise image, a random label each) are each put into a "
    "synthetic rehearsal site by a fair coin; the key-frame model "
    "(tiny preset) trains on it with the sites' patient-level DP-SGD at the given "
    "sigma, C and q. Each canary's score is its least-squares coefficient when the model "
    "update is regressed on every patient's gradient direction; the "
    f"{GUESS_FRACTION:.0%} of M highest scores are guessed 'in', as many lowest 'out' (fixed "
    "in advance). The bound is the largest epsilon that the number of correct guesses "
    "refutes at DELTA with the given confidence. A lower bound, and a loose one: below the "
    "claimed epsilon is expected; above it, the training leaks more than its accounting.\n\n"
    "Privacy values come from --site-config (its key-frame model's sigma, C and q, else its "
    "classifier's, and its delta and accountant) or all four of --noise-multiplier, "
    "--max-grad-norm, --sample-rate, --delta; an explicit one overrides the config's. "
    "--noise-multiplier 0 is the power check: no epsilon is claimed, and the bound must "
    "come out large.\n\n"
    "Writes OUT/empirical.json (for `busfed audit report --empirical`) and, without --data, "
    "the synthetic site in OUT/site.\n\n"
    "Exit codes:\n"
    "0  the bound is at most the claimed epsilon (or no epsilon is claimed)\n"
    "1  the bound exceeds the claimed epsilon\n"
    "2  bad usage: a missing privacy value, a bad option or site config\n"
    "3  the site data is unreadable or has no key frame\n"
    "4  an invalid privacy value"
)


def default_steps(sample_rate: float) -> int:
    """Steps that draw an included canary ``SAMPLED_PER_CANARY`` times on average."""
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return math.ceil(SAMPLED_PER_CANARY / sample_rate)


def _privacy_values(
    site_config: Path | None, explicit: dict[str, float | None], accountant: str | None
) -> tuple[dict[str, float], str]:
    """sigma, C, q and delta (by option name) and the accountant: explicit, else the config's."""
    values = dict(explicit)
    if site_config is not None:
        privacy = load_site_config(site_config).privacy
        model = privacy.keyframe or privacy.classifier
        stated = {
            "noise-multiplier": model.noise_multiplier,
            "max-grad-norm": model.max_grad_norm,
            "sample-rate": model.sample_rate,
            "delta": privacy.delta,
        }
        values = {k: stated[k] if v is None else v for k, v in values.items()}
        accountant = accountant or privacy.accountant
    missing = [f"--{k}" for k, v in values.items() if v is None]
    if missing:
        raise UsageError(
            f"no {', '.join(missing)}: give --site-config or every privacy value explicitly"
        )
    accountant = accountant or "rdp"
    if accountant not in KINDS:
        raise UsageError(f"--accountant must be one of {', '.join(KINDS)}, got {accountant!r}")
    return {k: float(v) for k, v in values.items() if v is not None}, accountant


@reports_errors
def empirical_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for empirical.json.")],
    site_config: Annotated[
        Path | None, typer.Option("--site-config", help="A site config: its privacy values.")
    ] = None,
    noise_multiplier: Annotated[
        float | None, typer.Option("--noise-multiplier", help="sigma; 0: the power check.")
    ] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option("--max-grad-norm", help="C, per-patient clip norm.")
    ] = None,
    sample_rate: Annotated[
        float | None, typer.Option("--sample-rate", help="q, Poisson rate of patients.")
    ] = None,
    delta: Annotated[float | None, typer.Option("--delta", help="delta of both epsilons.")] = None,
    accountant: Annotated[
        str | None, typer.Option("--accountant", help="rdp or prv (default: config's, else rdp).")
    ] = None,
    canaries: Annotated[int, typer.Option("--canaries", min=2, help="M canary patients.")] = 256,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", min=1, help=f"DP-SGD steps (default ceil({SAMPLED_PER_CANARY} / q))."
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="A site dataset; default: synthesise one.")
    ] = None,
    patients: Annotated[
        int, typer.Option("--patients", min=1, help="Patients of the synthesised site.")
    ] = 40,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    confidence: Annotated[
        float, typer.Option("--confidence", min=0.5, max=0.9999, help="Of the bound.")
    ] = 0.95,
    threads: Annotated[
        int,
        typer.Option(
            "--threads", min=1, help="CPU threads (the tiny model runs best on one or two)."
        ),
    ] = 1,
) -> None:
    # torch and the sites' training code load only for this command.
    import torch

    from deploy.audit.empirical import AuditPlan, rehearsal_site, run_empirical_audit

    values, kind = _privacy_values(
        site_config,
        {
            "noise-multiplier": noise_multiplier,
            "max-grad-norm": max_grad_norm,
            "sample-rate": sample_rate,
            "delta": delta,
        },
        accountant,
    )
    rate = values["sample-rate"]
    plan = AuditPlan(
        noise_multiplier=values["noise-multiplier"],
        max_grad_norm=values["max-grad-norm"],
        sample_rate=rate,
        delta=values["delta"],
        accountant=cast(Literal["rdp", "prv"], kind),
        canaries=canaries,
        steps=steps or default_steps(rate),
        confidence=confidence,
        seed=seed,
    )
    console = Console(highlight=False)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console,
        ) as progress:  # fmt: skip
            tasks: dict[str, TaskID] = {}

            def tick(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=total)
                progress.update(tasks[stage], completed=done, total=total)

            if data is None:
                data = rehearsal_site(
                    out / "site",
                    patients=patients,
                    seed=seed,
                    progress=lambda done, total: tick("synthesising videos", done, total),
                )
            result = run_empirical_audit(plan, data=data, progress=tick)
    finally:
        torch.set_num_threads(previous_threads)  # a test session goes on with its own
    written = result.write(out / RESULT_FILE)
    _print(result, console)
    console.print(f"written: {written}")
    if not result.consistent:
        raise ValidationFailed(
            f"the empirical lower bound {result.epsilon_lower_bound:.3f} exceeds the claimed "
            f"epsilon {result.epsilon_claimed:.3f}: the training leaks more than accounted"
        )


def _print(result: EmpiricalAudit, console: Console) -> None:
    table = Table("", "value", title="one-run empirical audit (privacy unit: patient)")
    claimed = (
        "inf (noise off: no privacy claimed; this run checks the audit's power)"
        if result.epsilon_claimed is None
        else f"{result.epsilon_claimed:.3f} ({result.accountant})"
    )
    rows = [
        ("model", result.model),
        ("sigma, C, q, steps", f"{result.noise_multiplier:g}, {result.max_grad_norm:g}, "
         f"{result.sample_rate:g}, {result.steps}"),
        ("patients + canaries (in)", f"{result.n_patients} + {result.canaries} "
         f"({result.canaries_in})"),
        ("guesses in / out", f"{result.guesses_in} / {result.guesses_out}"),
        ("correct", f"{result.correct} of {result.guesses}"),
        (f"empirical epsilon lower bound at delta {result.delta:g}, "
         f"{result.confidence:.0%} confidence", f"{result.epsilon_lower_bound:.3f}"),
        (f"claimed epsilon at delta {result.delta:g}", claimed),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if result.consistent:
        console.print("[green]consistent[/green]: the bound does not exceed the claimed epsilon")
    else:
        console.print("[red]VIOLATION[/red]: the bound exceeds the claimed epsilon")
