"""Named training recipes for the demo models.

A recipe fixes everything that makes a model reproducible: data sizes and seed, the family and
its config, the optimiser settings, and the *floors* its held-out metrics must meet before it is
written to the repository. ``DEFAULT`` is what ``make models`` builds (≤ 10 minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from export.models.rnn import SCORERS
from export.train.loop import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str  # "translation" | "image-classification"
    family: str
    description: str
    model: dict[str, Any]
    train: TrainConfig
    data: dict[str, int]
    #: metric → minimum value on held-out data; export refuses a model below it
    floors: dict[str, float] = field(default_factory=dict)

    def scaled(self, *, n_train: int, n_test: int, epochs: int, floors: bool = False) -> Recipe:
        """A small variant for tests: fewer examples and epochs, floors dropped unless asked."""
        return dataclasses.replace(
            self,
            data={**self.data, "n_train": n_train, "n_test": n_test},
            train=dataclasses.replace(self.train, epochs=epochs, warmup_steps=10),
            floors=self.floors if floors else {},
        )


_RNN = {"emb_dim": 64, "enc_hidden": 96, "window": 4, "dropout": 0.1}
_DATES = {"n_train": 12000, "n_test": 2000, "seed": 0}

RECIPES: dict[str, Recipe] = {}


def _add(recipe: Recipe) -> None:
    RECIPES[recipe.name] = recipe


_add(
    Recipe(
        name="dates-bahdanau",
        task="translation",
        family="rnn-additive",
        description="Dates in en/fr/de/es → ISO 8601; bidirectional GRU + Bahdanau (additive) attention.",
        model=_RNN,
        train=TrainConfig(epochs=3, batch_size=64, lr=3e-3, warmup_steps=100),
        data=_DATES,
        floors={"exact_match": 0.99},
    )
)
_add(
    Recipe(
        name="dates-transformer",
        task="translation",
        family="transformer",
        description="Dates in en/fr/de/es → ISO 8601; Transformer encoder-decoder, 2+2 layers, 4 heads.",
        model={
            "d_model": 64,
            "heads": 4,
            "ff_dim": 192,
            "enc_layers": 2,
            "dec_layers": 2,
            "max_len": 64,
            "dropout": 0.0,
        },
        train=TrainConfig(epochs=8, batch_size=64, lr=2e-3, warmup_steps=200),
        data=_DATES,
        floors={"exact_match": 0.99},
    )
)
_add(
    Recipe(
        name="fashion-vit",
        task="image-classification",
        family="vit",
        description="Fashion-MNIST at random positions on 48×48 canvases; hybrid ViT, 8×8 patches.",
        model={
            "image_size": 48,
            "patch_size": 8,
            "channels": 1,
            "num_classes": 10,
            "dim": 64,
            "depth": 4,
            "heads": 4,
            "mlp_dim": 128,
            "stem_channels": 16,
        },
        train=TrainConfig(epochs=6, batch_size=128, lr=2e-3, warmup_steps=200, label_smoothing=0.1),
        data={"canvas": 48, "seed": 0, "n_train": 60000, "n_test": 10000},
        floors={"accuracy": 0.85},
    )
)

# Opt-in: the Luong scorers on the same data, for comparing attention (make models-all).
for _scorer in SCORERS:
    if _scorer != "additive":
        _add(
            dataclasses.replace(
                RECIPES["dates-bahdanau"],
                name=f"dates-luong-{_scorer}",
                family=f"rnn-{_scorer}",
                description=f"Dates → ISO 8601; bidirectional GRU + Luong {_scorer} attention.",
                floors={},
            )
        )

DEFAULT = ("dates-bahdanau", "dates-transformer", "fashion-vit")


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
