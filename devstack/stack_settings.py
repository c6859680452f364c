"""Settings a user hands to the local stack's services: ``--env-file``, ``--set``, the environment.

Pure functions, used by ``cascade up`` before anything starts. The services read ``CASCADE_*``
variables (:mod:`cascade.settings`); the stack passes the user's on, except the few it owns
itself (where Redis, NATS, Triton and the scoring port are), and checks the result by building
:class:`~cascade.settings.Settings` from it, so a bad value is one line naming the variable
rather than a traceback after Triton has started.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Final

from pydantic import ValidationError

from cascade.errors import ConfigurationError
from cascade.settings import Settings

__all__ = [
    "OWNED_BY_STACK",
    "SettingsInputError",
    "check_settings",
    "parse_assignments",
    "parse_env_file",
    "positive_int",
]

OWNED_BY_STACK: Final = {
    "CASCADE_REDIS__URL": "--redis-port",
    "CASCADE_REDIS__CLUSTER": "--cluster",
    "CASCADE_NATS__URL": "--nats-port",
    "CASCADE_TRITON__URL": "--triton-grpc-port",
    "CASCADE_SERVER__HOST": "(always 127.0.0.1)",
    "CASCADE_SERVER__PORT": "--port",
    "CASCADE_MODEL_DIR": "--model-dir",
}
"""Variables the stack sets itself, and the flag that sets each instead."""


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts: an int of at least 1, else an error naming the value."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse ``type`` for amounts that may be 0, else an error naming the value."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


class SettingsInputError(ConfigurationError, ValueError):
    """A settings file, a ``--set`` or a setting's value is unusable; the message says which."""


def parse_assignments(pairs: Sequence[str], *, source: str = "--set") -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> a dict; a pair without ``=`` or with an owned key is an error."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise SettingsInputError(f"{source}: expected KEY=VALUE, got {pair!r}")
        if key in OWNED_BY_STACK:
            raise SettingsInputError(
                f"{source}: {key} is set by the stack itself; use {OWNED_BY_STACK[key]}"
            )
        env[key] = value
    return env


def parse_env_file(text: str, *, name: str = "env file") -> dict[str, str]:
    """A dotenv-style file: ``KEY=VALUE`` lines, ``#`` comments, blank lines, an optional
    ``export`` prefix, and values in single or double quotes."""
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        pairs.append(f"{key}{sep}{value}")
        parse_assignments(pairs[-1:], source=f"{name} line {number}")  # errors name the line
    return parse_assignments(pairs, source=name)


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_settings(env: Mapping[str, str]) -> Settings:
    """The settings the services will build from ``env``; a :class:`SettingsInputError` naming
    the variable when one is invalid."""
    try:
        with _environment(env):
            return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "CASCADE_" + "__".join(str(p) for p in first["loc"]).upper()
        raise SettingsInputError(f"{where}: {first['msg']}") from None
