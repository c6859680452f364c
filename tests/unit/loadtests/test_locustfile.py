"""The Locust file is valid Python, and imports wherever Locust is installed."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

LOCUSTFILE = Path(__file__).resolve().parents[3] / "loadtests" / "locustfile.py"


def test_locustfile_is_syntax_valid_and_defines_a_user_that_fires_request_events() -> None:
    tree = ast.parse(LOCUSTFILE.read_text(), filename=str(LOCUSTFILE))
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert "ScoringUser" in classes
    assert [b.id for b in classes["ScoringUser"].bases if isinstance(b, ast.Name)] == ["User"]
    source = LOCUSTFILE.read_text()
    assert "events.request.fire(" in source and "grpc_gevent.init_gevent()" in source


def test_locustfile_imports_with_locust() -> None:
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (it is optional)")
    spec = importlib.util.spec_from_file_location("cascade_locustfile", LOCUSTFILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ScoringUser.host == "127.0.0.1:50051"
