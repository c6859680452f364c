"""Noticing that ``registry.json`` changed, cheaply: one ``stat`` per look.

A promote or rollback replaces the file (``os.replace``: a new inode), an edit rewrites it (new
size or mtime); either changes its signature. Orchestrators and screening workers poll it every
``rollout.reload_interval_s`` and then load the registry again.
"""

from __future__ import annotations

import os
from pathlib import Path

from cascade.model_registry import REGISTRY_FILE

__all__ = ["RegistryWatch", "registry_signature"]


def registry_signature(model_dir: Path) -> tuple[int, int, int] | None:
    """What changes when ``registry.json`` is replaced or rewritten (inode, size, mtime), or
    None when it cannot be read: one ``stat`` call."""
    try:
        st = os.stat(model_dir / REGISTRY_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class RegistryWatch:
    """Notices a changed ``registry.json`` by polling its signature (one stat per interval)."""

    def __init__(self, model_dir: Path) -> None:
        self._model_dir = model_dir
        self._seen = registry_signature(model_dir)

    def changed(self) -> bool:
        """True once per change of the file (a missing file is no change: keep serving)."""
        now = registry_signature(self._model_dir)
        if now is None or now == self._seen:
            return False
        self._seen = now
        return True
