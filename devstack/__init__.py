"""The developer's tools around the product: the local stack and its server processes, the
``cascade`` CLI, sample traffic, and the local trace receiver and viewer.

Nothing in the runtime (``cascade``, ``orchestrator``, ``stages``) imports this package; the
production image ships without it (``deploy/Dockerfile``).
"""
