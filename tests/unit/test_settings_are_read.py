"""No setting that nothing reads: every field of :class:`cascade.settings.Settings` (groups
included) is read somewhere in the code outside the settings module."""

from __future__ import annotations

import re

from pydantic import BaseModel

from cascade.settings import REPO_ROOT, Settings

CODE_DIRS = ("cascade", "orchestrator", "stages", "devstack", "loadtests")


def fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += fields(annotation, f"{prefix}{name}.")
        else:
            out.append((prefix + name, name))
    return out


def test_every_setting_is_read_outside_the_settings_module() -> None:
    code = "\n".join(
        path.read_text()
        for folder in CODE_DIRS
        for path in (REPO_ROOT / folder).rglob("*.py")
        if path.name != "settings.py"
    )
    unread = [dotted for dotted, name in fields(Settings) if not re.search(rf"\.{name}\b", code)]
    assert unread == []
