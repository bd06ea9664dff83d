"""Regenerates the Python stubs for protos/recsys/v1/*.proto into protos/gen/.

    python protos/generate.py            # rewrite protos/gen
    python protos/generate.py --out DIR  # write elsewhere (the drift test does)

The stubs are checked in; tests/test_protos.py regenerates them and fails on drift.
grpcio-tools is pinned in pyproject.toml because the generated code records its version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
GEN_ROOT = PROTO_ROOT / "gen"
PACKAGE = Path("recsys") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) and returns the files it wrote under out_dir."""
    from grpc_tools import protoc

    import grpc_tools

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    # Package markers so the stubs import as `recsys.v1.<name>_pb2`.
    for package_dir in (out_dir / "recsys", out_dir / PACKAGE):
        (package_dir / "__init__.py").write_text('"""Generated from protos/; do not edit."""\n')
    return sorted(p for p in out_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=GEN_ROOT, help="output root (default: protos/gen)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
