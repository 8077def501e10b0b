"""The composition root: the one place that turns names into a running engine.

A model spec, a drafter spec and a policy name become a target, a drafter (with the STS
calibration saved beside it), a policy (with the cost table DSpark's scheduler needs) and a
:class:`~dspark.engine.batched.BatchEngine` over them. The command line (`generate`, `batch`),
`dspark eval`, `dspark data regen`, the benchmarks and the server build their engines here and
nowhere else (``tests/test_imports.py`` checks it), so a drafter, its calibration and the cost
table always travel together.
"""

from __future__ import annotations

from pathlib import Path

from dspark.drafters.base import Drafter, NoDrafter
from dspark.drafters.factory import DrafterSpec, as_batch_drafter, has_confidences, make_drafter, resolve_drafter
from dspark.engine.batched import BatchEngine
from dspark.engine.single import SpeculativeEngine
from dspark.scheduling.calibration import load_calibration
from dspark.scheduling.cost import CostModel
from dspark.scheduling.factory import make_policy
from dspark.scheduling.policy import Calibrate, Policy
from dspark.target.model import TargetModel

PLAIN = "plain"
"""The policy of plain decoding: it runs without a drafter."""
AUTO = "auto"
"""DSpark's scheduler for a drafter with confidences, else verify every drafted token."""


def check_policy(spec: str) -> None:
    """Refuse an unknown or malformed policy name in one line, before anything loads."""
    if spec not in (AUTO, "dspark"):
        make_policy(spec)


def resolve_policy(policy: str, drafter) -> str:
    """``auto`` -> ``dspark`` when ``drafter`` gives confidences (Algorithm 1 over this
    machine's cost table: DSpark, n-gram lookup, the hybrid), else ``fixed`` (a draft model,
    DFlash, EAGLE-3: the whole block)."""
    if policy != AUTO:
        return policy
    return "dspark" if has_confidences(drafter) else "fixed"


def hybrid_calibration(spec: str | DrafterSpec) -> Calibrate | None:
    """The STS map a hybrid ``<dspark spec>+ngram`` applies to its DSpark rows (None otherwise)."""
    spec = resolve_drafter(spec)
    return drafter_calibration(spec.base) if spec.hybrid else None


def load_drafter(spec: str | DrafterSpec | None, target: TargetModel, gamma: int | None = None,
                 lookup_store: int | None = None) -> Drafter:
    """The drafter named by ``spec`` (None: the one shipped for this target, else n-gram), on
    the target's device and in its dtype, checked against the target; ``lookup_store``: see
    :func:`~dspark.drafters.factory.make_drafter`."""
    dtype = next(target.model.parameters()).dtype
    spec = resolve_drafter(spec, target.name)
    drafter = make_drafter(spec, gamma=gamma, device=str(target.device), dtype=dtype, calibrate=hybrid_calibration(spec),
                           lookup_store=lookup_store)
    drafter.check_target(target)
    return drafter


def build_single_engine(
    target: TargetModel, drafter: Drafter | str | DrafterSpec | None = None, gamma: int | None = None, policy: str | None = None,
    **engine_kwargs,
) -> "SpeculativeEngine | OneRequest":
    """A one-request engine over ``target`` with ``drafter`` or its spec (None: the shipped
    one). Without ``policy``, the batch-1 loop whose every round verifies the whole block (the
    reference loop of `dspark eval`); with one, the batched engine at R = 1 under that policy
    (what `dspark generate` runs), behind the same ``generate(request)``."""
    if policy is not None:
        if isinstance(drafter, NoDrafter):
            policy = PLAIN
        return OneRequest(build_engine(target, drafter, policy, 1, gamma=gamma, **engine_kwargs))
    if drafter is None or isinstance(drafter, (str, DrafterSpec)):
        drafter = load_drafter(drafter, target, gamma)
    return SpeculativeEngine(target, drafter)


class OneRequest:
    """A :class:`BatchEngine` of one slot behind the batch-1 engine's ``generate(request)``."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine, self.drafter, self.policy = engine, engine.drafter, engine.policy

    def generate(self, request, on_tokens=None):
        stream = (lambda _, ids: on_tokens(ids)) if on_tokens is not None else None
        return self.engine.generate([request], on_tokens=stream).results[0]


def drafter_calibration(spec: str | DrafterSpec | None) -> Calibrate | None:
    """The STS calibration saved beside a DSpark / DFlash drafter folder, if there is one
    (``spec`` None: the default target's default drafter; resolve another target's first).
    A hybrid has none here: it calibrates its own DSpark rows (:func:`hybrid_calibration`)."""
    folder = resolve_drafter(spec).calibration_folder
    return load_calibration(folder) if folder is not None else None


def needs_cost_table(policy: str) -> bool:
    return policy.partition(":")[0] == "dspark"


def cost_table_for(
    target: TargetModel,
    max_batch: int,
    max_draft: int,
    profile_dir: str | Path | None = None,
    profile_if_missing: bool = False,
    **measure_kwargs,
) -> CostModel:
    """This target's cost table SPS(R, W) covering ``max_batch`` rows of 1 + ``max_draft``
    tokens: loaded, or measured and saved when ``profile_if_missing``, else an error naming
    ``dspark profile``."""
    from dspark.scheduling.profiling import require_cost_table

    return require_cost_table(
        target, profile_dir, profile_if_missing, max_requests=max_batch, max_draft=max_draft, **measure_kwargs
    )


def build_engine(
    target: TargetModel,
    drafter: Drafter | str | DrafterSpec | None = None,
    policy: Policy | str = AUTO,
    max_batch: int = 1,
    *,
    gamma: int | None = None,
    calibrate: Calibrate | None = None,
    cost: CostModel | None = None,
    profile_dir: str | Path | None = None,
    profile_if_missing: bool = False,
    lazy_drafting: bool = True,
    backoff: bool = True,
    lookup_store: int | None = None,
) -> BatchEngine:
    """A batched engine over ``target``.

    ``drafter`` is a drafter or its spec (None: the shipped one); a spec brings the
    calibration saved beside it unless ``calibrate`` is given. ``policy`` is a policy or its
    name (``dspark.scheduling.factory.POLICY_HELP``): ``plain`` runs without a drafter, and
    ``dspark`` uses ``cost`` or this target's profiled cost table (see :func:`cost_table_for`);
    ``auto`` is :func:`resolve_policy`. ``lookup_store`` (a spec only): the ids of earlier
    requests prompt lookup keeps (:func:`~dspark.drafters.factory.make_drafter`).
    """
    if isinstance(policy, str) and policy == PLAIN:
        drafter = NoDrafter()
    if drafter is None or isinstance(drafter, (str, DrafterSpec)):
        spec = resolve_drafter(drafter, target.name)
        if calibrate is None:
            calibrate = drafter_calibration(spec)
        drafter = load_drafter(spec, target, gamma, lookup_store)
    batch_drafter = as_batch_drafter(drafter)
    if isinstance(policy, str):
        policy = resolve_policy(policy, batch_drafter)
        if cost is None and needs_cost_table(policy):
            cost = cost_table_for(target, max_batch, batch_drafter.gamma, profile_dir, profile_if_missing)
        policy = make_policy(policy, cost, calibrate)
    return BatchEngine(target, batch_drafter, policy, max_batch, lazy_drafting=lazy_drafting, backoff=backoff)
