"""The goodness-of-fit check shared by the losslessness tests.

Every check is a Pearson chi-square test of observed outcome counts against an *exact*
distribution that the test enumerated. ``ALPHA`` is the false-positive rate of one check: a
correct sampler fails it with probability ALPHA over the choice of seeds. The seeds are
fixed, so a given run is deterministic; a suite with k checks fails a correct sampler for a
fresh choice of seeds with probability at most k * ALPHA (Bonferroni).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping

from scipy.stats import chisquare

ALPHA = 1e-3
"""False-positive rate of one chi-square check."""
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
