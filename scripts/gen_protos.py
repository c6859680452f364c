"""Generate the Python stubs for protos/ into cascade/v1 (run by scripts/check; --check fails on drift)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "cascade" / "v1"


def _generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed stubs are stale"
    )
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _generate(Path(tmp))
        generated = Path(tmp) / "cascade" / "v1"
        names = sorted(p.name for p in generated.iterdir() if p.is_file())
        if opts.check:
            stale = [
                n
                for n in names
                if not (OUT_PACKAGE / n).exists()
                or not filecmp.cmp(generated / n, OUT_PACKAGE / n, shallow=False)
            ]
            if stale:
                print(
                    f"stale generated stubs: {stale}; run python scripts/gen_protos.py",
                    file=sys.stderr,
                )
                return 1
            return 0
        OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(generated / n, OUT_PACKAGE / n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
