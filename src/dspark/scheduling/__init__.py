"""Scheduling: how many drafted tokens each request verifies, and what a step costs.

- ``policy``: :class:`Schedule`, the :class:`Policy` protocol, fixed-γ, γ = 1, static threshold;
- ``algorithm1``: :class:`DSparkScheduler`, DSpark's Algorithm 1 over a cost model;
- ``cost``: the :class:`CostModel` protocol and :class:`FlatCost` SPS(B);
- ``profiling``: measured cost tables SPS(R, W) of the batched engine's step;
- ``gate``: :class:`SlotGate`, which stops drafting where the policy stops verifying;
- ``calibration``: Sequential Temperature Scaling of the confidences c_k;
- ``factory``: :func:`make_policy` from a command-line name.

Nothing here imports a drafter: :class:`SlotGate` is a plain callable with the signature of
:data:`dspark.drafters.base.DraftGate`, and the engine hands it to the drafter.
"""

from dspark.scheduling.algorithm1 import DSparkScheduler
from dspark.scheduling.cost import CostModel, FlatCost
from dspark.scheduling.factory import POLICY_HELP, make_policy
from dspark.scheduling.gate import SlotGate
from dspark.scheduling.policy import FixedGamma, Policy, Schedule, StaticThreshold, gamma_one

__all__ = [
    "CostModel",
    "DSparkScheduler",
    "FixedGamma",
    "FlatCost",
    "POLICY_HELP",
    "Policy",
    "Schedule",
    "SlotGate",
    "StaticThreshold",
    "gamma_one",
    "make_policy",
]
