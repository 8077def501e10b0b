"""The engines: the batch-1 loop and the continuous-batching one, and what they exchange.

- ``request``: :class:`GenerationRequest`, :class:`GenerationResult`, :class:`StopChecker`;
- ``single``: :class:`SpeculativeEngine`, prefill -> draft -> verify -> commit for one request;
- ``batched``: :class:`BatchEngine`, prefill -> draft -> schedule -> verify -> commit for many;
- ``stats``: :class:`GenerationStats`, τ, acceptance and where the time went.
"""

from dspark.engine.batched import BatchEngine, BatchResult, BatchStats, StepRecord
from dspark.engine.request import GenerationRequest, GenerationResult, StopChecker
from dspark.engine.single import SpeculativeEngine
from dspark.engine.stats import GenerationStats, RoundRecord

__all__ = [
    "BatchEngine",
    "BatchResult",
    "BatchStats",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "RoundRecord",
    "SpeculativeEngine",
    "StepRecord",
    "StopChecker",
]
