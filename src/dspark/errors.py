"""User-facing errors. The CLI prints these as one line instead of a traceback."""


class DsparkError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""


class ModelLoadError(DsparkError):
    """A model or tokenizer could not be found or loaded."""


class IncompatibleDrafterError(DsparkError):
    """A drafter does not fit the target (vocabulary, width or layers differ)."""


class NonFiniteLogits(DsparkError):
    """A model's logits (or a drafter's q) hold NaN or +inf: a broken checkpoint, or an
    overflow in its dtype. The request cannot be sampled; it fails alone."""
