"""The committed gRPC stubs are exactly what grpcio-tools generates from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    protos = sorted((ROOT / "service" / "api" / "protos").glob("*.proto"))
    (tmp_path / "service" / "api" / "protos").mkdir(parents=True)
    for proto in protos:
        shutil.copy(proto, tmp_path / "service" / "api" / "protos" / proto.name)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
           "--grpc_python_out=.", *[f"service/api/protos/{p.name}" for p in protos]]  # fmt: skip
    subprocess.run(cmd, cwd=tmp_path, check=True)
    generated = sorted(p.name for p in (tmp_path / "service" / "api" / "protos").glob("*_pb2*"))
    assert generated == sorted(p.name for p in (ROOT / "service" / "api" / "protos").glob("*_pb2*"))
    for name in generated:
        fresh = (tmp_path / "service" / "api" / "protos" / name).read_text()
        assert fresh == (ROOT / "service" / "api" / "protos" / name).read_text(), (
            f"run `make protos`: {name} is stale"
        )
