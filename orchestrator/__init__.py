"""The gRPC orchestrator: budget, routing, fallback, cache and tracing for one Score call."""
