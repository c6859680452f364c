"""A naive version of the same cascade, measured beside the real one as the baseline.

Same work, same models, same servers: it validates with :mod:`orchestrator.validation`, computes
features with :mod:`cascade.features`, screens with the same ONNX model in ONNX Runtime (its own
worker processes on NATS), escalates by the same policy to the same Triton model, and answers the
same ``cascade.v1.ScoringService/Score`` with the same timings fields. What it does naively, on
purpose (each item is an optimization the real path has or will have, so the ratio shows it):

* Redis: separate round trips, no pipelining: ``GET`` the cached answer, then ``LRANGE`` the
  history; after scoring ``SET``, ``LPUSH``, ``LTRIM``, ``EXPIRE`` one by one, *before* answering
  (no post-answer writer). All of it is counted in ``redis_us``.
* JSON instead of protobuf between the stages (feature rows and scores) and in the output cache.
* No batching in the worker; the worker does not warm its model before subscribing.
* No local deadline timer on the Triton call (the gRPC ``client_timeout`` only).
* No tracing at all (the real orchestrator always creates spans, exported or not).

It keeps what any sane implementation has: persistent connections (one Redis pool, one NATS
connection, one Triton channel), the same budget rule and the same fallbacks, so every answer it
gives is as correct as the real one's. Keys are prefixed ``naive:`` so its cache and card
histories never mix with the real cascade's in the shared Redis.
"""

from __future__ import annotations

from loadtests.naive.stack import NaiveStack

__all__ = ["NaiveStack"]
