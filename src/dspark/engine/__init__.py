"""The engines: the batch-1 loop and the continuous-batching one, and what they exchange.

- ``request``: :class:`GenerationRequest`, :class:`GenerationResult`, :class:`StopChecker`;
- ``single``: :class:`SpeculativeEngine`, prefill -> draft -> verify -> commit for one request;
- ``batched``: :class:`BatchEngine`, prefill -> draft -> schedule -> verify -> commit for many;
- ``session``: :class:`BatchSession`, an open batch that requests join and leave at any step;
- ``stats``: :class:`GenerationStats`, τ, acceptance and where the time went.
"""

from dspark.engine.batched import BatchEngine, BatchResult, BatchStats
from dspark.engine.session import BatchSession, StepEvents
from dspark.engine.request import GenerationRequest, GenerationResult, StopChecker
from dspark.engine.single import SpeculativeEngine
from dspark.engine.stats import GenerationStats, RoundRecord, StepRecord

__all__ = [
    "BatchEngine",
    "BatchResult",
    "BatchSession",
    "BatchStats",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "RoundRecord",
    "SpeculativeEngine",
    "StepEvents",
    "StepRecord",
    "StopChecker",
]
