"""Generate the protobuf and gRPC modules for proto/wanps.proto with grpcio-tools.

`python -m wanps.proto.generate OUT_DIR` writes wanps_pb2.py, wanps_pb2.pyi and
wanps_pb2_grpc.py into OUT_DIR. The proto is mapped to the virtual path
`wanps/proto/wanps.proto`, so the generated imports read `from wanps.proto import ...`.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

GENERATED = ("wanps_pb2.py", "wanps_pb2.pyi", "wanps_pb2_grpc.py")


def proto_source() -> Path:
    return Path(__file__).with_name("wanps.proto")


def generate(out_dir: Path, proto_file: Path | None = None) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    proto_file = proto_file or proto_source()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-Iwanps/proto={proto_file.parent}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"wanps/proto/{proto_file.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_file}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / "wanps" / "proto" / name, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).parent
    # When run from a checkout, read the .proto next to the output folder.
    local = out / "wanps.proto"
    for path in generate(out, local if local.exists() else None):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
