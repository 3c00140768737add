"""The demo's round table: fits 80 columns and says how many patients its val AUC rests on."""

from __future__ import annotations

from rich.console import Console

from deploy.demo import MIN_VAL_PATIENTS, round_table


def _round(n: int, val_patients: int, auc: float) -> dict:
    return {
        "round": n,
        "sites": {"hospital-a": {}, "hospital-b": {}, "hospital-c": {}},
        "dropped": [],
        "metrics": {
            "detector_loss": 0.154, "classifier_loss": 0.653, "epsilon_max": 3.34,
            "pooled_patient_val_auc": auc, "val_patients": float(val_patients),
            "round_seconds": 138.0,
        },
    }  # fmt: skip


def _render(rounds: list[dict]) -> list[str]:
    console = Console(width=80, record=True)
    console.print(round_table(rounds))
    return console.export_text().splitlines()


def test_a_val_auc_on_a_handful_of_patients_says_it_is_too_few_to_compare():
    lines = _render([_round(1, 6, 0.833), _round(2, 6, 0.5)])

    assert all(len(line) <= 80 for line in lines)
    words = " ".join(" ".join(lines).split())  # the caption wraps to the table's width
    assert "the sites' 6 validation patients pooled; too few to compare rounds" in words


def test_enough_validation_patients_are_named_without_the_warning():
    text = " ".join(" ".join(_render([_round(1, MIN_VAL_PATIENTS, 0.7)])).split())

    assert f"the sites' {MIN_VAL_PATIENTS} validation patients pooled" in text
    assert "too few" not in text
