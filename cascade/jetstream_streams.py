"""Creating the JetStream streams the cascade writes (the decision log, the outcomes).

One rule for every stream we own: add it, and when it exists with another configuration (a
deploy changed a limit), update it in place. Errors come out as the cascade's own tree, named
after the dependency that owns the stream.
"""

from __future__ import annotations

from typing import Final

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from cascade.errors import Dependency, translate_jetstream_errors

__all__ = ["ensure_stream", "owned_stream_config"]

_STREAM_EXISTS_DIFFERENTLY: Final = 10058  # JetStream's "stream name already in use"


def owned_stream_config(
    *,
    name: str,
    description: str,
    subject_prefix: str,
    max_age_s: float,
    replicas: int,
    dedup_window_s: float,
    max_bytes: int | None = None,
) -> StreamConfig:
    """A stream of ours: every subject under ``subject_prefix``, limits retention on file
    storage, the oldest messages discarded first, deduplicated by message id."""
    return StreamConfig(
        name=name,
        description=description,
        subjects=[f"{subject_prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_bytes=max_bytes,
        num_replicas=replicas,
        duplicate_window=dedup_window_s,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig, owner: Dependency) -> None:
    """Add the stream ``config`` describes, or update it when it exists configured otherwise;
    raises ``DependencyError`` for ``owner``."""
    with translate_jetstream_errors(owner):
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_EXISTS_DIFFERENTLY:
                raise
            await js.update_stream(config)
