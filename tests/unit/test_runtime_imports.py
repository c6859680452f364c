"""The runtime (``cascade``, ``orchestrator``, ``stages``) imports nothing of the tools.

A fresh interpreter refuses to import ``devstack`` (the local stack, CLI and samples),
``training``, ``loadtests`` and the training libraries, then imports every runtime module: what
the production image (which ships only the runtime) would run into.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from cascade.settings import REPO_ROOT

TOOLS = ("devstack", "training", "loadtests", "torch", "sklearn", "matplotlib")
# Run inside Triton's Python backend, which provides triton_python_backend_utils.
INSIDE_TRITON = ("stages.heavy.triton_model.model",)

PROBE = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    TOOLS, SKIP = sys.argv[1].split(","), set(sys.argv[2].split(","))

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in TOOLS:
                raise ImportError(f"the runtime imported {name}")
            return None

    sys.meta_path.insert(0, Refuse())
    imported = 0
    for package in ("cascade", "orchestrator", "stages"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if info.name not in SKIP:
                importlib.import_module(info.name)
                imported += 1
    print(imported)
    """
)


def test_runtime_modules_import_without_the_tools() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(TOOLS), ",".join(INSIDE_TRITON)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) >= 30  # every runtime module, not an empty walk
