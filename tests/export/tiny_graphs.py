"""Tiny random-weight models of every family and their exported graphs, exported and verified
once per session (``tiny_graphs`` in ``conftest.py``): the round-trip and float16 tests read the
same files, as ``make models`` exports a graph once and converts it after."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from export.graphs import GraphPlan, plans_for, transformer_prefix_plans
from export.models import build_model
from export.models.rnn import SCORERS
from export.onnx_export import ExportedGraph, export_graph

FAMILIES = [f"rnn-{s}" for s in SCORERS] + ["transformer", "transformer-prefix", "vit"]


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "vit":
        return build_model(
            family, {"image_size": 16, "patch_size": 4, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32}
        )
    vocab = {"src_vocab": 30, "tgt_vocab": 15}
    if family.startswith("transformer"):
        return build_model(
            "transformer",
            {**vocab, "d_model": 16, "heads": 2, "ff_dim": 32, "enc_layers": 1, "dec_layers": 2},
        )
    return build_model(family, {**vocab, "emb_dim": 8, "enc_hidden": 8, "window": 2})


@dataclass(frozen=True)
class Exported:
    """One family's graphs as the exporter wrote and verified them (read-only: tests that write
    files write them in their own directory)."""

    directory: Path
    plans: list[GraphPlan]
    graphs: list[ExportedGraph]


@dataclass
class TinyGraphs:
    root: Path
    done: dict[str, Exported] = field(default_factory=dict)

    def __call__(self, family: str) -> Exported:
        """``family``'s graphs, exported on first use; ``transformer-prefix`` is the whole-prefix
        contract of repositories exported before the KV-cached one."""
        if family not in self.done:
            model = tiny(family)
            plans = transformer_prefix_plans(model) if family == "transformer-prefix" else plans_for(model)  # type: ignore[arg-type]
            directory = self.root / family
            directory.mkdir(parents=True, exist_ok=True)  # a failed export: again, same error
            self.done[family] = Exported(directory, plans, [export_graph(p, directory) for p in plans])
        return self.done[family]
