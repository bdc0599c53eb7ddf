"""Regenerate the DMI stubs from api.proto: `python -m mapper.dmi.generate [OUT_DIR]`.

The proto is compiled with the repository root as include path, so the generated gRPC
module imports `from mapper.dmi import api_pb2` and works as part of the package. Without
OUT_DIR the committed stubs beside api.proto are overwritten; tests pass a temp dir and
compare the result with the committed files.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO = Path(__file__).with_name("api.proto")
REPO_ROOT = PROTO.parents[2]
PROTO_NAME = PROTO.relative_to(REPO_ROOT).as_posix()  # "mapper/dmi/api.proto"


def generate(out_dir: Path | None = None) -> list[Path]:
    """Compile api.proto; returns the two generated files (api_pb2.py, api_pb2_grpc.py)."""
    from grpc_tools import protoc  # a build-time tool, not a runtime dependency

    root = out_dir if out_dir is not None else REPO_ROOT
    root.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/any.proto
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={root}",
        f"--grpc_python_out={root}",
        str(PROTO),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} for {PROTO}")
    package = root / PROTO.parent.relative_to(REPO_ROOT)
    return [package / "api_pb2.py", package / "api_pb2_grpc.py"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else None
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
