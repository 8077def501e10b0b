"""The EAGLE-3 baseline drafter: one decoder layer over fused target features, chain drafting."""

from dspark.drafters.eagle3.config import Eagle3Config
from dspark.drafters.eagle3.drafter import Eagle3Drafter
from dspark.drafters.eagle3.model import Eagle3Model

__all__ = ["Eagle3Config", "Eagle3Drafter", "Eagle3Model"]
