"""The service's attention maps against PyTorch's on the same inputs (issue #8).

Export already compares each ONNX graph with its PyTorch module at a few random shapes. This
checks what a client actually sees on top of that — tokenisation, padding a batch of different
lengths, the numpy decoder's bookkeeping, rollout — by recomputing every map the service's own
code returned with the PyTorch model: teacher-forced on the tokens the service generated for
translation, on the same pixels for images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.faithfulness import VISION_MAPS, vision_maps
from export.graphs import SEQ_SHAPES, Shape
from export.models.transformer import Transformer
from export.models.vit import VisionTransformer
from export.onnx_export import TOLERANCE, ExportVerificationError
from service.inference.decoding import StepFn, log_softmax, new_search, run_searches
from service.inference.manifest import Manifest
from service.inference.translation import Translation, Translator
from service.inference.vision import Classifier

PROVIDERS = ["CPUExecutionProvider"]


@torch.no_grad()
def torch_alignment(
    model: nn.Module, source_ids: Sequence[int], target_ids: Sequence[int], bos: int
) -> np.ndarray:
    """PyTorch's attention for one pair, teacher-forced: (T, S) for an RNN, (T, layers, heads, S)
    for a Transformer — the layout of :attr:`service.inference.translation.Translation.attention`."""
    src = torch.tensor([list(source_ids)])  # (1, S)
    mask = torch.ones_like(src, dtype=torch.bool)
    tgt_in = torch.tensor([[bos, *target_ids[:-1]]])  # (1, T): BOS, then all but the last token
    if isinstance(model, Transformer):
        _, cross = model.decode(tgt_in, model.encode(src, mask), mask)  # (1, layers, heads, T, S)
        return cross[0].permute(2, 0, 1, 3).numpy()  # (T, layers, heads, S)
    _, attention = model(src, mask, tgt_in)  # (1, T, S)
    return attention[0].numpy()


def target_ids(translator: Translator, result: Translation) -> list[int]:
    ids = [translator.target_tokenizer.token_to_id(t) for t in result.target_tokens]
    if any(i is None for i in ids):
        raise ValueError(f"a generated token is not in the target vocabulary: {result.target_tokens}")
    return [i for i in ids if i is not None]


def translation_map_diff(
    directory: Path, manifest: Manifest, model: nn.Module, texts: Sequence[str]
) -> float:
    """Max |service − PyTorch| over every attention value of greedy translations of ``texts``,
    translated together in one padded batch as the service does."""
    translator = Translator(directory, manifest, PROVIDERS, threads=2)
    assert manifest.translation is not None
    bos = manifest.translation.target_tokenizer.bos_id
    worst = 0.0
    for text, result in zip(texts, translator.translate(list(texts)), strict=True):
        source_ids, _ = translator.tokenize(text)
        offline = torch_alignment(model, source_ids, target_ids(translator, result), bos)
        worst = max(worst, float(np.abs(result.attention - offline).max()))
    return worst


@torch.no_grad()
def vision_map_diff(
    directory: Path, manifest: Manifest, model: VisionTransformer, pixels: np.ndarray
) -> dict[str, float]:
    """Max |service − PyTorch| of the raw attentions and of each map the service draws from them
    (rollout per head fusion, last-layer CLS) for normalised ``pixels`` (N, C, H, W)."""
    assert manifest.image is not None
    prefix = manifest.image.prefix_tokens
    served = Classifier(directory, manifest, PROVIDERS, threads=2).classify(pixels)
    _, offline = model(torch.from_numpy(pixels))  # (N, layers, heads, T, T)
    diffs = dict.fromkeys(("attentions", *VISION_MAPS), 0.0)
    for ours, theirs in zip(served, offline.numpy(), strict=True):
        assert ours.attentions is not None
        diffs["attentions"] = max(diffs["attentions"], float(np.abs(ours.attentions - theirs).max()))
        offline_maps = vision_maps(theirs, prefix)
        for name, grid in vision_maps(ours.attentions, prefix).items():
            diffs[name] = max(diffs[name], float(np.abs(grid - offline_maps[name]).max()))
    return diffs


def _prefix_step(model: Transformer, src: torch.Tensor, mask: torch.Tensor) -> StepFn:
    """PyTorch's decoder step on the whole prefix, as the numpy searches call it."""
    memory = model.encode(src, mask)

    def step(owners: np.ndarray, prefixes: np.ndarray, state: None, t: int) -> tuple[Any, Any, None]:
        index = torch.from_numpy(owners)
        logits, cross = model.step(torch.from_numpy(prefixes), memory[index], mask[index])
        return log_softmax(logits.numpy()), cross.numpy(), None

    return step


@torch.no_grad()
def cached_decode_parity(
    directory: Path,
    manifest: Manifest,
    model: Transformer,
    shapes: Sequence[Shape] = SEQ_SHAPES,
    beams: Sequence[int] = (1, 3),
    max_len: int = 16,
    tolerance: float = TOLERANCE,
) -> dict[str, float]:
    """Whole decodes through the exported KV-cached graphs (the service's own decoder, ONNX
    Runtime) against PyTorch decoding the same sources with the whole prefix at every step
    (``Transformer.step``), greedy and beam, at several batch shapes: the tokens must be identical
    and the scores and every attention value within ``tolerance``. Returns the worst differences;
    raises :class:`ExportVerificationError` otherwise."""
    assert manifest.translation is not None
    spec = manifest.translation
    translator = Translator(directory, manifest, PROVIDERS, threads=1)
    worst = {"decode.score": 0.0, "decode.attention": 0.0}
    for i, shape in enumerate(shapes):
        gen = torch.Generator().manual_seed(300 + i)
        lengths = torch.randint(1, shape["src_len"] + 1, (shape["batch"],), generator=gen).tolist()
        lengths[0] = shape["src_len"]
        high = spec.source_tokenizer.vocab_size
        rows = [[*torch.randint(4, high, (n - 1,), generator=gen).tolist(), spec.source_tokenizer.eos_id]
                for n in lengths]  # fmt: skip
        width = max(lengths)
        src = torch.tensor([r + [spec.source_tokenizer.pad_id] * (width - len(r)) for r in rows])
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        step = _prefix_step(model, src, mask)
        tgt = spec.target_tokenizer
        limit = translator.target_limit(max_len)  # the service stops at the manifest's limit too
        for beam in beams:
            served = translator.translate_ids(rows, [[""] * len(r) for r in rows], beam, limit)
            searches = [new_search(tgt.bos_id, tgt.eos_id, limit, beam, 0.0, len(r)) for r in rows]
            for ours, theirs in zip(served, run_searches(step, searches, None), strict=True):
                expected = [translator.target_tokenizer.id_to_token(t) or "" for t in theirs.tokens]
                if theirs.finished:
                    expected.append(translator.target_tokenizer.id_to_token(tgt.eos_id) or "")
                if ours.target_tokens != expected or ours.finished != theirs.finished:
                    raise ExportVerificationError(
                        f"{manifest.name}: the KV-cached graphs decode other tokens than PyTorch at {shape}, "
                        f"beam {beam}"
                    )
                worst["decode.score"] = max(worst["decode.score"], abs(ours.score - theirs.score))
                diff = float(np.abs(ours.attention - theirs.attention).max())
                worst["decode.attention"] = max(worst["decode.attention"], diff)
    bad = {k: v for k, v in worst.items() if not v <= tolerance}
    if bad:
        raise ExportVerificationError(f"{manifest.name}: cached decoding differs from PyTorch: {bad}")
    return worst
