"""The import contract that keeps the architecture visible from the tree:

- ``service/inference/`` (the core) imports neither Ray, an HTTP or gRPC library, nor the API
  or hosting layers;
- ``service/api/`` (protocol adapters) may import the core, never the hosting layer or Ray;
- ``service/hosting/`` may import both;
- nothing in ``service/`` imports torch or ``export``;
- ``export/`` uses the service only through its core (to evaluate the very artifact it serves).

``service/settings/`` and ``service/errors.py`` are shared by every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ("fastapi", "starlette", "uvicorn", "grpc", "google.protobuf", "multipart", "python_multipart")
RULES: dict[str, tuple[str, ...]] = {
    "service/inference": ("ray", *WEB, "service.api", "service.hosting", "torch", "export"),
    "service/api": ("ray", "service.hosting", "torch", "export"),
    "service/hosting": ("torch", "export"),
    "service": ("torch", "export"),
}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def sources(folder: str) -> list[Path]:
    return [p for p in sorted((ROOT / folder).rglob("*.py")) if "protos" not in p.parts]


@pytest.mark.parametrize("layer", list(RULES))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources(layer)
        for name in sorted(imports(path))
        if forbidden(name, RULES[layer])
    ]
    assert not broken, "\n".join(broken)


def test_export_uses_only_the_inference_core() -> None:
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources("export")
        for name in sorted(imports(path))
        if forbidden(name, ("service",)) and not forbidden(name, ("service.inference",))
    ]
    assert not broken, "\n".join(broken)


def test_the_layers_are_packages_and_the_contract_sees_them() -> None:
    for layer in ("service/inference", "service/api", "service/hosting"):
        assert (ROOT / layer / "__init__.py").exists()
        assert len(sources(layer)) >= 3
    assert "ray" in imports(ROOT / "service" / "hosting" / "in_replica.py") or any(
        forbidden(n, ("ray",)) for n in imports(ROOT / "service" / "hosting" / "in_replica.py")
    )  # the checker would see a forbidden import where there is one
