"""Building drafters: the one place that maps command-line names to drafter classes.

:func:`resolve_drafter` reads a command-line spec once, for one target, into a
:class:`DrafterSpec` (kind, argument, folder, hybrid or not); every entry point, the
composition root and the benchmarks read specs through it. ``make_drafter`` turns a spec into
a drafter:

- ``none``: plain decoding (the reference);
- ``ngram``: prompt lookup;
- ``model:<id|folder|file.gguf>``: an independent draft model sharing the tokenizer;
- ``dspark``: the DSpark drafter shipped for the target (:func:`resolve_drafter`; the
  default target's where none is named);
- ``dspark:<folder>`` / ``dflash:<folder>``: a trained DSpark or DFlash checkpoint;
- ``eagle3:<folder>``: a trained EAGLE-3 checkpoint (the chain-drafting baseline);
- ``<dspark spec>+ngram``: prompt lookup where it is confident, that DSpark drafter elsewhere
  (:mod:`dspark.drafters.hybrid`), e.g. ``dspark+ngram``.

``as_batch_drafter`` gives any drafter the batched engine's interface. Only this module
imports concrete drafters, so the protocols in :mod:`dspark.drafters.base` depend on none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dspark.drafters.base import BatchDrafter, Drafter, NoDrafter
from dspark.drafters.ngram import NgramConfig, NgramDrafter
from dspark.errors import DsparkError

DRAFTER_HELP = ("none | ngram | model:<HF id|folder|.gguf> | dspark[:<folder>] | dflash:<folder> | eagle3:<folder> "
                "| dspark[:<folder>]+ngram")
HYBRID = "+ngram"
"""The suffix that adds prompt lookup to a DSpark drafter spec."""
SHIPPED_DRAFTERS = Path(__file__).resolve().parent.parent / "assets" / "drafters"
"""Drafters shipped inside the package, one folder ``<target name>-dspark`` per target."""
SHIPPED_DRAFTER = SHIPPED_DRAFTERS / "smollm2-135m-instruct-dspark"
"""The DSpark drafter trained for the embedded default target (fp16, no embedding/LM head)."""


def shipped_dspark_spec(model: str | None = None) -> str | None:
    """The DSpark drafter the package ships for target ``model`` (a spec such as
    ``gemma3-270m``; None: the default target): ``dspark`` for the default target,
    ``dspark:<folder>`` for another, None where none ships."""
    from dspark.target.loading import DEFAULT_MODEL

    folder = SHIPPED_DRAFTERS / f"{model or DEFAULT_MODEL}-dspark"
    if not (folder / "config.json").is_file():
        return None
    return "dspark" if folder == SHIPPED_DRAFTER else f"dspark:{folder}"


def default_drafter_spec(model: str | None = None) -> str:
    """The drafter a target gets when none is named: the hybrid of the DSpark drafter shipped
    for it and prompt lookup (``dspark+ngram``, ``dspark:<folder>+ngram``), else ``ngram``,
    which fits every target."""
    shipped = shipped_dspark_spec(model)
    return shipped + HYBRID if shipped is not None else "ngram"


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter spec as :func:`resolve_drafter` reads it: resolved for one target, parsed once."""

    text: str
    """The resolved spec, e.g. ``dspark:<folder>+ngram``: what engines build and results record."""
    kind: str
    """The name before the first colon (of the part before ``+ngram``): none, ngram, model,
    dspark, dflash or eagle3; :func:`make_drafter` refuses anything else."""
    arg: str
    """What follows that colon: a model id or a checkpoint folder; "" where none is given."""
    hybrid: bool
    """``+ngram``: prompt lookup beside the DSpark drafter that ``kind`` and ``arg`` name."""

    @property
    def base(self) -> "DrafterSpec":
        """The drafter without prompt lookup: itself unless it is a hybrid."""
        return DrafterSpec(self.text.removesuffix(HYBRID), self.kind, self.arg, False) if self.hybrid else self

    @property
    def folder(self) -> Path | None:
        """The checkpoint folder of a dspark / dflash spec (a bare one: the shipped DSpark
        drafter) or of an eagle3 spec; None for the rest."""
        if self.kind in ("dspark", "dflash"):
            return Path(self.arg).expanduser() if self.arg else SHIPPED_DRAFTER
        if self.kind == "eagle3":
            return Path(self.arg).expanduser()
        return None

    @property
    def calibration_folder(self) -> Path | None:
        """Where the STS calibration of this drafter's confidences is saved: the folder of a
        dspark / dflash spec; None for a hybrid (it calibrates its DSpark rows itself, from
        ``base``) and for every other drafter."""
        return self.folder if self.kind in ("dspark", "dflash") and not self.hybrid else None


def resolve_drafter(spec: "str | DrafterSpec | None", model: str | None = None) -> DrafterSpec:
    """The drafter ``spec`` names for target ``model`` (None: the default target), parsed:
    None is :func:`default_drafter_spec`, a bare ``dspark`` is the DSpark drafter shipped for
    ``model`` where the package has one (the default target's otherwise), any other spec is
    taken as given. Nothing is checked here: :func:`make_drafter` refuses what it cannot build."""
    if isinstance(spec, DrafterSpec):
        return spec
    text = _resolve_text(spec, model)
    hybrid = text.endswith(HYBRID)
    kind, _, arg = text.removesuffix(HYBRID).partition(":") if hybrid else text.partition(":")
    return DrafterSpec(text, kind, arg, hybrid)


def _resolve_text(spec: str | None, model: str | None) -> str:
    if spec is None:
        return default_drafter_spec(model)
    if spec.endswith(HYBRID):
        return _resolve_text(spec.removesuffix(HYBRID), model) + HYBRID
    if spec == "dspark":
        return shipped_dspark_spec(model) or spec
    return spec


def make_drafter(spec: "str | DrafterSpec", gamma: int | None = None, device: str = "cpu", dtype=None,
                 calibrate=None, lookup_store: int | None = None) -> Drafter:
    """Build the drafter named by ``spec`` (see the module docstring). ``calibrate``: for a
    hybrid, its DSpark drafter's STS map (the composition root loads it: drafters do not
    import the scheduling layer, :func:`dspark.engine.build.hybrid_calibration`).
    ``lookup_store``: most ids of earlier requests that prompt lookup (``ngram``, a hybrid)
    keeps to match across requests (0: none; None: ``NgramConfig``'s default).

    A draft model, DSpark, DFlash or EAGLE-3 drafter runs in ``dtype`` (a ``torch.dtype``: the
    target's, default float32).
    """
    spec = resolve_drafter(spec)
    if spec.hybrid:
        return _hybrid(spec.base, gamma, device, dtype, calibrate, lookup_store)
    kind, arg, folder = spec.kind, spec.arg, spec.folder
    if kind == "none" and not arg:
        return NoDrafter()
    if kind == "ngram" and not arg:
        return NgramDrafter(lookup_config(gamma or 7, lookup_store))
    if kind == "model" and arg:
        from dspark.drafters.draft_model import DraftModelDrafter

        return DraftModelDrafter.load(arg, gamma=gamma or 5, device=device, dtype=dtype)
    if kind == "eagle3":
        from dspark.drafters.eagle3 import Eagle3Drafter
        from dspark.drafters.eagle3.config import is_eagle3_folder

        if not arg or not (folder / "config.json").is_file():
            raise DsparkError(f"eagle3 needs a checkpoint folder: eagle3:<folder> (no config.json at {folder})")
        if not is_eagle3_folder(folder):
            raise DsparkError(f"{folder} holds no EAGLE-3 drafter; use dspark:{folder} or dflash:{folder}")
        return _load_checkpoint(Eagle3Drafter, folder, gamma, device, dtype)
    if kind in ("dspark", "dflash"):
        from dspark.drafters.dspark import DSparkDrafter
        from dspark.drafters.eagle3.config import is_eagle3_folder

        if not arg and kind == "dflash":
            raise DsparkError("dflash needs a checkpoint folder: dflash:<folder>")
        if not (folder / "config.json").is_file():
            raise DsparkError(f"no DSpark drafter at {folder} (expected config.json and model.safetensors)")
        if is_eagle3_folder(folder):
            raise DsparkError(f"{folder} holds an EAGLE-3 drafter; use eagle3:{folder}")
        drafter = _load_checkpoint(DSparkDrafter, folder, gamma, device, dtype)
        if kind == "dflash" and not drafter.config.is_dflash:
            raise DsparkError(f"{folder} holds a DSpark drafter, not DFlash; use dspark:{folder}")
        return drafter
    raise DsparkError(f"unknown drafter {spec.text!r}; choose one of: {DRAFTER_HELP}")


def lookup_config(gamma: int, lookup_store: int | None) -> NgramConfig:
    """Prompt lookup's settings: ``gamma`` slots, ``lookup_store`` ids of earlier requests (None: the default)."""
    return NgramConfig(gamma=gamma) if lookup_store is None else NgramConfig(gamma=gamma, store_tokens=lookup_store)


def _hybrid(base: DrafterSpec, gamma, device, dtype, calibrate, lookup_store) -> Drafter:
    """``base`` (a DSpark drafter with a confidence head) + prompt lookup; ``calibrate``: base's STS."""
    from dspark.drafters.hybrid import HybridDrafter

    if base.kind != "dspark":
        raise DsparkError(f"+ngram combines lookup with a DSpark drafter (dspark[:<folder>]+ngram), got {base.text!r}+ngram")
    drafter = make_drafter(base, gamma, device, dtype)
    if not has_confidences(drafter):
        raise DsparkError(f"{base.text} has no confidence head, which the hybrid needs to choose between its drafters")
    return HybridDrafter(drafter, NgramDrafter(lookup_config(gamma or drafter.gamma, lookup_store)), calibrate)


def _load_checkpoint(cls, folder: Path, gamma, device, dtype):
    """``cls.load(folder, ...)``, with truncated, missing or mismatched weights as one line."""
    from safetensors import SafetensorError

    try:
        return cls.load(folder, gamma=gamma, device=device, dtype=dtype)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise DsparkError(f"could not load the drafter at {folder}: {exc}") from exc


def has_confidences(drafter) -> bool:
    """Whether ``drafter`` (either form) gives each slot a confidence c_k, which DSpark's
    scheduler needs: a DSpark drafter with its confidence head, or one that says so
    (``gives_confidences``: n-gram lookup's online estimate, the hybrid, and the batched form
    of any drafter with margins, :class:`~dspark.drafters.online_confidence.MarginConfidence`)."""
    if getattr(drafter, "gives_confidences", False):
        return True
    model = getattr(drafter, "model", None)
    return getattr(model, "confidence_head", None) is not None


def as_batch_drafter(drafter) -> BatchDrafter:
    """The batched form of ``drafter``: itself if it already is one, DSpark's, EAGLE-3's or the
    hybrid's own batched path, else a LoopedDrafter. A drafter without confidences whose blocks
    carry their top-2 margins (a draft model, DFlash, EAGLE-3) gets them learnt online
    (:class:`~dspark.drafters.online_confidence.MarginConfidence`), so the scheduler can trim it."""
    from dspark.drafters.dspark.drafter import DSparkDrafter
    from dspark.drafters.draft_model import DraftModelDrafter
    from dspark.drafters.eagle3.drafter import Eagle3Drafter
    from dspark.drafters.hybrid import HybridDrafter
    from dspark.drafters.looped import LoopedDrafter
    from dspark.drafters.online_confidence import MarginConfidence

    if isinstance(drafter, BatchDrafter):
        return drafter
    batched = drafter.batched() if isinstance(drafter, (DSparkDrafter, Eagle3Drafter, HybridDrafter)) else LoopedDrafter(drafter)
    if isinstance(drafter, (DSparkDrafter, Eagle3Drafter, DraftModelDrafter)) and not has_confidences(batched):
        return MarginConfidence(batched)
    return batched
