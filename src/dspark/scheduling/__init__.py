"""Scheduling: how many drafted tokens each request verifies, and what a step costs.

- ``policy``: :class:`Schedule`, the :class:`Policy` protocol, fixed-γ, γ = 1, static threshold;
- ``algorithm1``: :class:`DSparkScheduler`, DSpark's Algorithm 1 over a cost model;
- ``cost``: the :class:`CostModel` protocol and :class:`FlatCost` SPS(B);
- ``profiling``: measured cost tables SPS(R, W) of the batched engine's step;
- ``gate``: :func:`slot_gate`, which stops drafting where the policy stops verifying;
- ``calibration``: Sequential Temperature Scaling of the confidences c_k;
- ``factory``: :func:`make_policy` from a command-line name.

Nothing here imports a drafter: :func:`slot_gate` makes a plain callable with the signature of
:class:`dspark.drafters.base.DraftGate`, and the engine hands it to the drafter.
"""

from dspark.scheduling.algorithm1 import DSparkScheduler
from dspark.scheduling.cost import CostModel, FlatCost
from dspark.scheduling.factory import POLICY_HELP, make_policy
from dspark.scheduling.gate import slot_gate
from dspark.scheduling.policy import Calibrate, FixedGamma, Policy, Schedule, StaticThreshold, StepOutcome, gamma_one

__all__ = [
    "Calibrate",
    "CostModel",
    "DSparkScheduler",
    "FixedGamma",
    "FlatCost",
    "POLICY_HELP",
    "Policy",
    "Schedule",
    "StaticThreshold",
    "StepOutcome",
    "gamma_one",
    "make_policy",
    "slot_gate",
]
