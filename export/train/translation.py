"""Train a translation model (RNN or Transformer) on parallel text, whatever the corpus.

A corpus module (``export.train.dates``, ``export.train.bible``) turns its recipe data into a
:class:`ParallelData` — source and target strings plus the tokenizers learned from them — and this
module does the rest: ids, padding, teacher forcing, and the shared loop of ``export.train.loop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from export.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from export.models import build_model
from export.train.loop import TrainConfig, batches, fit, length_buckets


@dataclass
class ParallelData:
    sources: list[str]
    targets: list[str]
    source_tokenizer: Tokenizer  # appends EOS, as the encoder expects
    target_tokenizer: Tokenizer  # plain ids: BOS and EOS are added here, for teacher forcing
    #: bucket batches by length: worth it when lengths vary a lot (sentences), not for dates
    bucket: bool = False


def pad(rows: Sequence[Sequence[int]]) -> Tensor:
    """(N, longest) ids, right-padded with PAD."""
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def encode_pairs(data: ParallelData) -> tuple[Tensor, Tensor, Tensor]:
    """→ src (N, S) padded ids, tgt_in (N, T) = BOS + target, tgt_out (N, T) = target + EOS."""
    src = [e.ids for e in data.source_tokenizer.encode_batch(data.sources)]
    tgt = [e.ids for e in data.target_tokenizer.encode_batch(data.targets)]
    return pad(src), pad([[BOS_ID, *ids] for ids in tgt]), pad([[*ids, EOS_ID] for ids in tgt])


def _trim(ids: Tensor) -> Tensor:
    """Drop the columns that are padding in every row of the batch."""
    return ids[:, : int((ids != PAD_ID).sum(1).max())]


def train(family: str, model_cfg: dict, train_cfg: TrainConfig, data: ParallelData, desc: str) -> nn.Module:
    torch.manual_seed(train_cfg.seed)
    vocab = {
        "src_vocab": data.source_tokenizer.get_vocab_size(),
        "tgt_vocab": data.target_tokenizer.get_vocab_size(),
    }
    model = build_model(family, {**model_cfg, **vocab})
    src, tgt_in, tgt_out = encode_pairs(data)
    criterion = nn.CrossEntropyLoss(ignore_index=PAD_ID, label_smoothing=train_cfg.label_smoothing)

    def loss_fn(index: Tensor) -> Tensor:
        batch_src = _trim(src[index])  # trim the batch to its longest rows
        batch_out = _trim(tgt_out[index])
        batch_in = tgt_in[index][:, : batch_out.shape[1]]
        logits, _ = model(batch_src, batch_src != PAD_ID, batch_in)
        return criterion(logits.flatten(0, 1), batch_out.flatten())

    lengths = (src != PAD_ID).sum(1) + (tgt_out != PAD_ID).sum(1)
    sampler = length_buckets(lengths) if data.bucket else batches
    fit(model, len(data.sources), loss_fn, train_cfg, desc, sampler)
    return model
