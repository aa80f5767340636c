"""Translation over an exported encoder + decoder-step pair (no torch).

Tokenise → pad into one batch → encode once → greedy or beam search over the decoder step,
where every step advances all live rows of all inputs in one graph call → detokenise. Attention
comes back per generated token: (target, source) for RNN decoders and (target, layers, heads,
source) for Transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.inference.decoding import Hypothesis, beam_search, log_softmax
from service.inference.manifest import Manifest
from service.inference.runtime import GraphSession


@dataclass
class Translation:
    text: str
    source_tokens: list[str]
    target_tokens: list[str]  # generated tokens, EOS last when it was reached
    score: float
    attention: np.ndarray  # (len(target_tokens), src_len[, ...]) — see module docstring
    finished: bool


class Translator:
    def __init__(self, directory: Path, manifest: Manifest, providers: list[str], threads: int = 1) -> None:
        spec = manifest.translation
        if spec is None:
            raise ValueError(f"{manifest.name} is not a translation model")
        self.spec = spec
        self.encoder = GraphSession(
            directory / manifest.graphs["encoder"].file, manifest.graphs["encoder"], providers, threads
        )
        self.decoder = GraphSession(
            directory / manifest.graphs["decoder_step"].file,
            manifest.graphs["decoder_step"],
            providers,
            threads,
        )
        self.source_tokenizer = Tokenizer.from_file(str(directory / spec.source_tokenizer.file))
        self.target_tokenizer = Tokenizer.from_file(str(directory / spec.target_tokenizer.file))

    def tokenize(self, text: str) -> tuple[list[int], list[str]]:
        """→ source ids (EOS last, truncated to the model's limit) and their token strings."""
        ids = self.source_tokenizer.encode(text).ids
        limit = self.spec.max_source_tokens
        if len(ids) > limit:
            ids = [*ids[: limit - 1], self.spec.source_tokenizer.eos_id]
        return ids, [self.source_tokenizer.id_to_token(t) or "" for t in ids]

    def translate(
        self, texts: list[str], beam_size: int = 1, max_length: int | None = None, length_penalty: float = 0.0
    ) -> list[Translation]:
        rows, tokens = zip(*(self.tokenize(t) for t in texts), strict=True)
        return self.translate_ids(list(rows), list(tokens), beam_size, max_length, length_penalty)

    def translate_ids(
        self,
        rows: list[list[int]],
        source_tokens: list[list[str]],
        beam_size: int = 1,
        max_length: int | None = None,
        length_penalty: float = 0.0,
    ) -> list[Translation]:
        """One padded batch through the encoder, then batched greedy/beam search."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.spec.source_tokenizer.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
        encoded = self.encoder.run({"src": ids, "src_mask": mask})
        memory = encoded["memory"]
        tgt = self.spec.target_tokenizer
        rnn = self.spec.decoder == "rnn"

        def step(rows: np.ndarray, prefixes: np.ndarray, states: np.ndarray | None, t: int):
            feeds = {
                "memory": memory[rows],
                "src_mask": mask[rows],
                "tokens": prefixes,
                "prev_tokens": prefixes[:, -1],
                "state": states,
                "step": np.full(len(rows), t, dtype=np.int64),
            }
            out = self.decoder.run(feeds)
            attention = out["attention"] if rnn else out["cross_attention"]
            return log_softmax(out["logits"]), attention, out.get("new_state")

        limit = min(max_length or self.spec.max_target_tokens, self.spec.max_target_tokens)
        hyps = beam_search(
            step,
            len(rows),
            tgt.bos_id,
            tgt.eos_id,
            limit,
            encoded.get("init_state"),
            beam_size,
            length_penalty,
        )
        return [self._result(h, toks) for h, toks in zip(hyps, source_tokens, strict=True)]

    def _result(self, hyp: Hypothesis, source_tokens: list[str]) -> Translation:
        tgt = self.spec.target_tokenizer
        ids = [*hyp.tokens, tgt.eos_id] if hyp.finished else hyp.tokens
        attention = hyp.attention[..., : len(source_tokens)]  # drop the batch's padding columns
        return Translation(
            text=self.target_tokenizer.decode(hyp.tokens, skip_special_tokens=True),
            source_tokens=source_tokens,
            target_tokens=[self.target_tokenizer.id_to_token(i) or "" for i in ids],
            score=hyp.score,
            attention=attention,
            finished=hyp.finished,
        )
