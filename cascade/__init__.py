"""Shared code of the fraud-scoring cascade: settings, errors, features, telemetry, local servers."""
