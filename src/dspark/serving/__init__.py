"""``dspark serve``: an OpenAI-compatible HTTP server over the batched engine.

- ``config``: :class:`ServeSettings`, what one server serves and how much it admits;
- ``protocol``: the OpenAI wire format (pydantic request bodies that refuse what they cannot
  honour, response and chunk builders, the error shape);
- ``text``: :class:`TextStream`, committed ids to safe text deltas for streaming;
- ``metrics``: :class:`ServeMetrics`, Prometheus counters in vLLM's names, and the running
  calibration of predicted against realised acceptance;
- ``loop``: :class:`EngineLoop`, the one thread that drives a
  :class:`~dspark.engine.session.BatchSession` with continuous batching;
- ``app``: :func:`create_app`, the FastAPI application.

The layer sits above ``engine`` and below ``cli``; fastapi, uvicorn and prometheus_client
come with the ``serve`` extra and are imported only by these modules.
"""
