"""The goodness-of-fit check shared by the losslessness tests.

Every check is a Pearson chi-square test (or its exact two-cell form, a binomial test) of
observed outcome counts against an *exact* distribution that the test enumerated. ``ALPHA`` is
the false-positive rate of one check: a correct sampler fails it with probability ALPHA over
the choice of seeds. The seeds are fixed, so a given run is deterministic; a suite with k
checks fails a correct sampler for a fresh choice of seeds with probability at most k * ALPHA
(Bonferroni).

Checks that must also *catch* a named mutant run at ``STRICT_ALPHA`` and state their miss
rate, computed from the mutant's exact output distribution with the helpers at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np
from scipy.signal import fftconvolve
from scipy.stats import binomtest, chi2, chisquare, ncx2

ALPHA = 1e-3
"""False-positive rate of one chi-square check."""
STRICT_ALPHA = 1e-4
"""False-positive rate of a check that must also catch a stated mutant (miss rate <= 1e-4)."""
MIN_EXPECTED = 5.0
"""Cells expected to hold fewer observations than this are pooled (the usual chi-square rule)."""


@dataclass(frozen=True)
class GoodnessOfFit:
    """The outcome of one chi-square check."""

    pvalue: float
    """0.0 when an outcome of exact probability 0 was observed."""
    cells: int
    """Cells after pooling the rare outcomes (degrees of freedom + 1)."""
    n: int
    """Observations."""
    impossible: int
    """Observations of outcomes that have probability 0 under the exact distribution."""

    @property
    def rejected(self) -> bool:
        return self.pvalue < ALPHA


def chisquare_gof(observed: Mapping[Hashable, int], exact: Mapping[Hashable, float]) -> GoodnessOfFit:
    """Test ``observed`` counts against the ``exact`` outcome probabilities (summing to 1).

    Outcomes whose expected count is under MIN_EXPECTED are pooled into one cell (and that
    cell into the rarest remaining one if it is still too small). Observing an outcome of
    probability 0 is a certain failure, reported as p-value 0.
    """
    n = sum(observed.values())
    total = sum(exact.values())
    if n <= 0:
        raise ValueError("no observations")
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"the exact distribution sums to {total}, not 1")
    impossible = sum(c for k, c in observed.items() if exact.get(k, 0.0) <= 0.0)
    support = sorted((k for k, p in exact.items() if p > 0.0), key=lambda k: -exact[k])
    obs, exp = [], []
    pooled_obs, pooled_exp = 0, 0.0
    for k in support:
        e = n * exact[k] / total
        if e >= MIN_EXPECTED:
            obs.append(observed.get(k, 0))
            exp.append(e)
        else:
            pooled_obs += observed.get(k, 0)
            pooled_exp += e
    pooled_obs += impossible  # so that observed and expected totals agree
    if pooled_exp >= MIN_EXPECTED or (pooled_exp > 0.0 and not exp):
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    elif pooled_exp > 0.0:
        obs[-1] += pooled_obs
        exp[-1] += pooled_exp
    if impossible:
        return GoodnessOfFit(0.0, len(obs), n, impossible)
    if len(obs) < 2:
        raise ValueError("fewer than 2 cells: the check could not fail; take more samples")
    pvalue = float(chisquare(obs, exp).pvalue)
    return GoodnessOfFit(pvalue, len(obs), n, 0)


# -- power: how often a check misses a mutant whose exact output distribution is known --------------


def chisquare_miss_rate(exact: Mapping[Hashable, float], mutant: Mapping[Hashable, float], n: int, alpha: float) -> float:
    """Pr[the chi-square check of n draws from ``mutant`` against ``exact`` passes], over the
    same cells as ``exact`` (no pooling): the noncentral chi-square approximation, with
    noncentrality n·Σ (mutant - exact)² / exact and len(exact) - 1 degrees of freedom."""
    cells = [k for k, p in exact.items() if p > 0.0]
    if abs(sum(mutant.get(k, 0.0) for k in cells) - 1.0) > 1e-9:
        raise ValueError("the mutant puts mass outside the support of the exact distribution")
    df = len(cells) - 1
    shift = n * sum((mutant.get(k, 0.0) - exact[k]) ** 2 / exact[k] for k in cells)
    return float(ncx2.cdf(chi2.isf(alpha, df), df, shift))


def binomial_acceptance_region(trials: int, p: float, alpha: float) -> tuple[int, int]:
    """[lo, hi]: the counts that scipy's two-sided exact ``binomtest(k, trials, p)`` does not
    reject at ``alpha`` (its p-value falls monotonically away from the mode, so the region
    is an interval; found by bisection on each side)."""
    mode = int(trials * p)

    def passes(k: int) -> bool:
        return binomtest(k, trials, p).pvalue >= alpha

    lo, hi = 0, mode
    while lo < hi:  # the smallest passing count below the mode
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid + 1, hi)
    first = lo
    lo, hi = mode, trials
    while lo < hi:  # the largest passing count above it
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid - 1)
    return first, lo


def pmf_of_sum(pmf: np.ndarray, n: int) -> np.ndarray:
    """The distribution of the sum of n independent draws from ``pmf`` over 0..len-1, by
    repeated squaring with FFT convolutions (float64: errors ~1e-15 of the largest cell)."""
    out, power = np.ones(1), np.asarray(pmf, dtype=np.float64)
    while n:
        if n & 1:
            out = np.clip(fftconvolve(out, power), 0.0, None)
        n >>= 1
        if n:
            power = np.clip(fftconvolve(power, power), 0.0, None)
    return out / out.sum()
