"""Generates the Python stubs of sparsebert.proto next to it (they are build products, not
committed): at install (`make install`) and, if missing or older than the proto, on first import."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "sparsebert.proto"
ROOT = HERE.parent.parent  # the import root: stubs import each other as server.rpc.*
OUTPUTS = [HERE / name for name in ("sparsebert_pb2.py", "sparsebert_pb2.pyi", "sparsebert_pb2_grpc.py")]


def stale() -> bool:
    return any(not out.is_file() or out.stat().st_mtime < PROTO.stat().st_mtime for out in OUTPUTS)


def generate() -> None:
    from grpc_tools import protoc  # build-time tool: imported only when generating

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    relative = PROTO.relative_to(ROOT)
    status = protoc.main(
        ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
         f"--grpc_python_out={ROOT}", str(relative)]
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"protoc failed ({status}) on {PROTO}")


def ensure() -> None:
    if stale():
        generate()


if __name__ == "__main__":
    generate()
    print(f"generated {', '.join(out.name for out in OUTPUTS)}")  # noqa: T201 (a command's output)
