"""Finding the server executables that the ``servers`` extra installs (or the system provides)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from devstack.servers._errors import ServerBinaryNotFoundError

if TYPE_CHECKING:
    from collections.abc import Iterable


def find_executable(name: str, candidates: Iterable[Path | None], hint: str) -> Path:
    """Return the first executable among ``candidates``, else ``name`` on PATH.

    Raises:
        ServerBinaryNotFoundError: naming every place searched and ``hint`` (how to install it).
    """
    searched: list[str] = []
    for candidate in candidates:
        if candidate is None:
            continue
        searched.append(str(candidate))
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which(name)
    if on_path is not None:
        return Path(on_path)
    searched.append(f"{name} on PATH")
    raise ServerBinaryNotFoundError(f"{name} not found (searched {', '.join(searched)}); {hint}")


def next_to_python(name: str) -> Path:
    """Where a console script of this environment lives: beside ``sys.executable``.

    The path is not resolved, so a virtualenv's ``bin/`` is kept even when its python is a symlink.
    """
    return Path(sys.executable).parent / name
