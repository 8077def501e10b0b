"""The DSpark drafter: parallel backbone + Markov/RNN head + confidence head (DFlash with heads off)."""

from dspark.drafters.dspark.config import DSparkConfig
from dspark.drafters.dspark.drafter import DSparkDrafter
from dspark.drafters.dspark.model import ContextKV, DSparkModel

__all__ = ["DSparkConfig", "DSparkDrafter", "DSparkModel", "ContextKV"]
