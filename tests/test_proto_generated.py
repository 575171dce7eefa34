"""The committed gRPC modules are exactly what `make proto` generates from proto/wanps.proto."""
from __future__ import annotations

from pathlib import Path

from wanps.proto.generate import GENERATED, generate

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"


def test_regenerating_changes_nothing(tmp_path):
    generate(tmp_path, PROTO_DIR / "wanps.proto")
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (PROTO_DIR / name).read_text(), f"{name} is stale: run `make proto`"


def test_generated_imports_use_the_package_path():
    grpc_module = (PROTO_DIR / "wanps_pb2_grpc.py").read_text()
    assert "from wanps.proto import wanps_pb2" in grpc_module
