"""Train a translation model (RNN or Transformer) on the ``dates`` task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from export.data import dates
from export.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, char_tokenizer
from export.models import build_model
from export.train.loop import TrainConfig, fit


@dataclass
class DatesData:
    train: list[dates.DateExample]
    source_tokenizer: Tokenizer
    target_tokenizer: Tokenizer


def prepare(n_train: int, seed: int) -> DatesData:
    """The training examples (the train side of ``dates.splits``) and tokenizers built from them;
    the held-out side comes from ``export.evaluate.translation_test_set``."""
    train = list(dates.generate(n_train, seed))
    src_tok = char_tokenizer((ex.source for ex in train), append_eos=True)
    tgt_tok = char_tokenizer("0123456789-", append_eos=False)
    return DatesData(train, src_tok, tgt_tok)


def encode_pairs(data: DatesData, examples: list[dates.DateExample]) -> tuple[Tensor, Tensor, Tensor]:
    """→ src (N, S) padded ids, tgt_in (N, T) = BOS + target, tgt_out (N, T) = target + EOS."""
    src = [e.ids for e in data.source_tokenizer.encode_batch([ex.source for ex in examples])]
    tgt = [e.ids for e in data.target_tokenizer.encode_batch([ex.target for ex in examples])]
    width = max(map(len, src))
    src_t = torch.full((len(src), width), PAD_ID, dtype=torch.long)
    for i, ids in enumerate(src):
        src_t[i, : len(ids)] = torch.tensor(ids)
    tgt_t = torch.tensor(tgt)  # every ISO date has the same length
    bos = torch.full((len(tgt), 1), BOS_ID)
    eos = torch.full((len(tgt), 1), EOS_ID)
    return src_t, torch.cat([bos, tgt_t], 1), torch.cat([tgt_t, eos], 1)


def train(family: str, model_cfg: dict, train_cfg: TrainConfig, data: DatesData, desc: str) -> nn.Module:
    torch.manual_seed(train_cfg.seed)
    vocab = {
        "src_vocab": data.source_tokenizer.get_vocab_size(),
        "tgt_vocab": data.target_tokenizer.get_vocab_size(),
    }
    model = build_model(family, {**model_cfg, **vocab})
    src, tgt_in, tgt_out = encode_pairs(data, data.train)
    criterion = nn.CrossEntropyLoss(ignore_index=PAD_ID, label_smoothing=train_cfg.label_smoothing)

    def loss_fn(index: Tensor) -> Tensor:
        batch_src = src[index]
        width = int((batch_src != PAD_ID).sum(1).max())  # trim the batch to its longest row
        batch_src = batch_src[:, :width]
        logits, _ = model(batch_src, batch_src != PAD_ID, tgt_in[index])
        return criterion(logits.flatten(0, 1), tgt_out[index].flatten())

    fit(model, len(data.train), loss_fn, train_cfg, desc)
    return model
