"""The engines an eval or a calibration runs: one per drafter spec, over one target.

Every engine comes from the composition root (:mod:`dspark.engine.build`). The drafters are
built before the target loads, so a bad spec or broken drafter files fail in a second; each
DSpark / DFlash drafter brings the STS calibration saved beside it (the eval's confidence
check reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dspark.evaluation.runner import REFERENCE


@dataclass(frozen=True)
class EvalEngines:
    """The target, one engine per drafter spec, and each drafter's stored calibration."""

    target: object
    """The :class:`~dspark.target.TargetModel` every engine verifies with."""
    engines: dict
    """Drafter spec -> an engine with ``generate(request)`` and ``drafter``."""
    calibrations: dict
    """Drafter spec -> its :class:`~dspark.scheduling.calibration.Calibration`, or None."""


def drafter_specs(given: Sequence[str | None] | None, model: str | None = None) -> list[str]:
    """The specs to compare on target ``model``, each resolved once (None: the default
    drafter), duplicates dropped, plain decoding (the reference) first."""
    from dspark.drafters import resolve_drafter

    specs = list(dict.fromkeys(resolve_drafter(s, model).text for s in (given or [None])))
    return [REFERENCE] + [s for s in specs if s != REFERENCE]


def load_engines(model, specs, gamma, device, dtype=None, policy=None, lookup_store=None) -> EvalEngines:
    """The target, one engine per drafter spec (under ``policy``: see ``build_single_engine``),
    and each drafter's stored calibration (or None); DSpark drafters run in the target's dtype;
    ``lookup_store``: see :func:`~dspark.drafters.factory.make_drafter`."""
    from dspark.drafters import make_drafter, resolve_drafter
    from dspark.engine.build import build_single_engine, hybrid_calibration
    from dspark.scheduling.calibration import Calibration
    from dspark.target import TargetModel

    drafters = {s: make_drafter(s, gamma=gamma, device=device, dtype=dtype, calibrate=hybrid_calibration(s),
                                lookup_store=lookup_store)
                for s in specs}  # fail fast, before the target loads
    target = TargetModel.load(model, device=device, dtype=dtype)
    calibrations = {}
    for s in specs:
        folder = resolve_drafter(s).calibration_folder  # a hybrid: None, it calibrates its own rows
        calibrations[s] = Calibration.load(folder) if folder is not None else None
    engines = {
        s: build_single_engine(target, d, policy=policy, **({} if policy is None else {
            "calibrate": calibrations[s].apply if calibrations[s] is not None else None, "profile_if_missing": True}))
        for s, d in drafters.items()
    }
    return EvalEngines(target, engines, calibrations)
