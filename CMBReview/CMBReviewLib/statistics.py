"""The study's statistics: the paper's Table 4, kappas with 95% CIs, case-level agreement, reading time.

Definitions, units and choices are written out in docs/review.md. Kappa, its standard error and
its interval come from statsmodels (`statsmodels.stats.inter_rater`); only the bootstrap around
Fleiss' kappa, for which statsmodels gives no interval, is ours.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from statsmodels.stats.inter_rater import aggregate_raters, cohens_kappa, fleiss_kappa

COUNT_CATEGORIES = ("0", "1", "2-4", "5-10", ">10")  # the usual CMB burden bands (e.g. MARS studies)
FLEISS_BOOTSTRAP = 2000
ALPHA = 0.05


def count_category(n: int) -> int:
    """Index into COUNT_CATEGORIES of a microbleed count."""
    if n < 0:
        raise ValueError(f"a count cannot be negative: {n}")
    return 0 if n == 0 else 1 if n == 1 else 2 if n <= 4 else 3 if n <= 10 else 4


@dataclass
class Table4Row:
    """One reader's column of the paper's Table 4 (counts of labels, percentages of their sum)."""

    correct: float
    incorrect: float
    missed: float
    pending: float = 0  # detector lesions this reader has not judged yet (not in the percentages)
    possible: float = 0  # of the correct and missed, those marked "possible" rather than "definite"

    @property
    def total(self) -> float:
        return self.correct + self.incorrect + self.missed

    def percent(self, part: str) -> float | None:
        return 100.0 * getattr(self, part) / self.total if self.total else None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("correct", "incorrect", "missed", "total", "pending", "possible")}
        d.update({f"{k}_percent": self.percent(k) for k in ("correct", "incorrect", "missed")})
        return d


def table4_average(rows: list[Table4Row]) -> Table4Row | None:
    """The paper's Average column: mean counts; its percentages are of the mean total (778.4 of 834.6 = 93.3%)."""
    if not rows:
        return None
    mean = lambda k: float(np.mean([getattr(r, k) for r in rows]))  # noqa: E731
    return Table4Row(mean("correct"), mean("incorrect"), mean("missed"), mean("pending"), mean("possible"))


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def cohen(a: np.ndarray, b: np.ndarray, n_categories: int, weights: str | None = None) -> dict:
    """Cohen's kappa of two raters over the same items, with statsmodels' SE and 95% CI.

    a, b: integer categories 0..n_categories-1. Undefined (None, with the reason) when the
    expected agreement is 1, i.e. both raters gave a single category to everything.
    """
    a, b = np.asarray(a, int), np.asarray(b, int)
    out: dict = {"n": int(a.size), "observed_agreement": float(np.mean(a == b)) if a.size else None}
    if a.size == 0:
        return {**out, "kappa": None, "se": None, "ci95": None, "note": "no items rated by both"}
    table = np.zeros((n_categories, n_categories))
    np.add.at(table, (a, b), 1)
    p = table / table.sum()
    pe = float(p.sum(0) @ p.sum(1))
    if pe >= 1 - 1e-12:
        return {**out, "kappa": None, "se": None, "ci95": None, "note": "undefined: both raters gave every item the same category"}
    if (table.sum(0) > 0).sum() == 1 or (table.sum(1) > 0).sum() == 1:
        # One rater used a single category: observed and expected agreement coincide, so kappa
        # is 0 by construction, and the asymptotic SE degenerates to 0; no interval is honest.
        return {**out, "kappa": 0.0, "se": None, "ci95": None, "table": table.astype(int).tolist(),
                "note": "one rater gave every item the same category: kappa is 0 by construction"}  # fmt: skip
    with warnings.catch_warnings():  # a zero SE (perfect agreement) makes statsmodels warn; we report None
        warnings.simplefilter("ignore", RuntimeWarning)
        res = cohens_kappa(table, wt=weights, return_results=True)  # its CI is at alpha = 0.05
    se = _finite(res.std_kappa)
    result = {**out, "kappa": float(res.kappa), "se": se, "ci95": None, "table": table.astype(int).tolist()}
    if not se:
        # At kappa = -1 or 1 the asymptotic SE is 0: a zero-width interval would claim certainty.
        return {**result, "note": "the asymptotic standard error is 0 here (kappa at -1 or 1): no interval"}
    # kappa +- 1.96 SE can leave [-1, 1] on few items; kappa cannot, so neither may its interval.
    low, high = float(res.kappa_low), float(res.kappa_upp)
    result["ci95"] = [max(low, -1.0), min(high, 1.0)]
    if low < -1 or high > 1:
        result["note"] = "95% interval clipped to [-1, 1]: too few items for the asymptotic interval"
    return result


def fleiss(ratings: np.ndarray, n_categories: int, n_boot: int = FLEISS_BOOTSTRAP, seed: int = 0) -> dict:
    """Fleiss' kappa of m readers over n items (ratings: n x m categories), statsmodels' estimate,
    with a 95% percentile bootstrap interval over items (statsmodels gives no interval)."""
    ratings = np.asarray(ratings, int)
    if ratings.ndim != 2 or ratings.shape[1] < 2:
        return {"n": int(ratings.shape[0]) if ratings.ndim == 2 else 0, "kappa": None, "ci95": None, "note": "needs two readers or more"}
    n = ratings.shape[0]
    if n == 0:
        return {"n": 0, "raters": int(ratings.shape[1]), "kappa": None, "ci95": None, "note": "no items rated by every reader"}
    counts, _ = aggregate_raters(ratings, n_cat=n_categories)

    def estimate(table: np.ndarray) -> float:
        p = table.sum(0) / table.sum()
        if p.max() >= 1 - 1e-12:
            return float("nan")  # every rating in one category: undefined
        return float(fleiss_kappa(table, method="fleiss"))

    kappa = estimate(counts)
    if not math.isfinite(kappa):
        return {"n": n, "raters": int(ratings.shape[1]), "kappa": None, "ci95": None, "note": "undefined: every rating in one category"}
    rng = np.random.default_rng(seed)
    boot = np.array([estimate(counts[rng.integers(0, n, n)]) for _ in range(n_boot)]) if n_boot else np.array([])
    boot = boot[np.isfinite(boot)]
    ci = [float(np.quantile(boot, ALPHA / 2)), float(np.quantile(boot, 1 - ALPHA / 2))] if boot.size >= 20 else None
    return {
        "n": n, "raters": int(ratings.shape[1]), "kappa": kappa, "ci95": ci,
        "ci_method": f"percentile bootstrap over items, {n_boot} resamples, seed {seed}",
        "observed_agreement": float(np.mean([np.mean(r == r[0]) == 1 for r in ratings])),
    }  # fmt: skip


def reading_time(seconds: list[float]) -> dict:
    s = np.asarray([v for v in seconds if v is not None], float)
    if s.size == 0:
        return {"cases": 0, "mean_s": None, "median_s": None, "total_s": 0.0}
    return {"cases": int(s.size), "mean_s": float(s.mean()), "median_s": float(np.median(s)), "total_s": float(s.sum())}
