"""Building policies from their command-line names."""

from __future__ import annotations

from dspark.errors import DsparkError
from dspark.scheduling.algorithm1 import DSparkScheduler
from dspark.scheduling.cost import CostModel
from dspark.scheduling.policy import Calibrate, FixedGamma, Policy, StaticThreshold, gamma_one

POLICY_HELP = "auto | plain | fixed[:γ] | gamma1 | threshold:<t> | dspark"
"""`auto` is resolved by the composition root (`engine.build.resolve_policy`), never here."""


def make_policy(spec: str, cost: CostModel | None = None, calibrate: Calibrate | None = None) -> Policy:
    """Build a policy from its command-line name (see POLICY_HELP); ``calibrate`` is the
    drafter's STS calibration, which the policies that read confidences apply.

    ``plain`` verifies the anchor only (ℓ = 0); pair it with the ``none`` drafter to avoid
    drafting at all. ``dspark`` needs ``cost``; it never falls back to verifying everything.
    """
    kind, _, arg = spec.partition(":")
    try:
        if kind == "plain" and not arg:
            return FixedGamma(0, name="plain")
        if kind == "fixed":
            return FixedGamma(int(arg) if arg else None)
        if kind == "gamma1" and not arg:
            return gamma_one()
        if kind == "threshold" and arg:
            return StaticThreshold(float(arg), calibrate)
    except ValueError as exc:
        raise DsparkError(f"bad policy {spec!r}: {exc}") from None
    if kind == "dspark" and not arg:
        return DSparkScheduler(cost, calibrate=calibrate)
    raise DsparkError(f"unknown policy {spec!r}; choose one of: {POLICY_HELP}")
