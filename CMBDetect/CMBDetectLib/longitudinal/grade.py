"""ARIA-H radiographic severity from the count of new microbleeds, as the lecanemab (Leqembi)
and donanemab (Kisunla) prescribing information grade it: mild 1-4, moderate 5-9, severe >= 10.
Superficial siderosis, the other half of that grade, is not assessed here."""

from __future__ import annotations

GRADES = (("none", 0), ("mild", 1), ("moderate", 5), ("severe", 10))  # (grade, fewest new microbleeds)


def aria_h_grade(new_microbleeds: int) -> str:
    if new_microbleeds < 0:
        raise ValueError(f"a count of new microbleeds cannot be negative ({new_microbleeds})")
    return [name for name, least in GRADES if new_microbleeds >= least][-1]
