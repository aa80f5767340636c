"""``build_app``: what it refuses before Ray starts — names in the settings that the repository
does not hold, which did nothing, silently (an override of ``fashion_vit`` left ``fashion-vit`` at
its defaults; ``ATTN_MODELS`` with one wrong name started with the others)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.hosting.app import NoModels, build_app
from service.settings import Settings


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"model_overrides": {"fashion_vit": {"max_batch_size": 4}}},
            "ATTN_MODEL_OVERRIDES names ['fashion_vit']",
        ),
        ({"models": ["fashion-vit", "Fashion-Vit"]}, "ATTN_MODELS names ['Fashion-Vit']"),
        ({"models": []}, "no servable model"),
    ],
)
def test_names_the_repository_does_not_hold_are_refused(
    tiny_repository: Path, settings: dict[str, object], named: str
) -> None:
    with pytest.raises(NoModels) as refused:
        build_app(Settings(repository=tiny_repository, **settings))  # type: ignore[arg-type]
    assert named in str(refused.value)
    if "names" in named:
        assert "it holds ['dates-bahdanau', 'dates-transformer', 'fashion-vit'" in str(refused.value)
    else:
        assert "ATTN_MODELS is []" in str(refused.value) and "empty" not in str(refused.value)


def test_known_names_build(tiny_repository: Path) -> None:
    overrides = {"fashion-vit": {"max_batch_size": 4}}
    build_app(Settings(repository=tiny_repository, models=["fashion-vit"], model_overrides=overrides))  # type: ignore[arg-type]
