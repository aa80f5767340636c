"""service/ must run without PyTorch: import every module with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import service

PROBE = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not allowed in service/")
sys.meta_path.insert(0, Block())
import service
for mod in pkgutil.walk_packages(service.__path__, "service."):
    if mod.name != "service.__main__":
        importlib.import_module(mod.name)
print("ok", len(sys.modules))
"""


def test_service_imports_without_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=Path(service.__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
