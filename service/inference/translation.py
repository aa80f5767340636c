"""Translation over an exported encoder + decoder-step pair (no torch).

Tokenise → pad into one batch → encode once → greedy or beam search over the decoder step,
where every step advances all live rows of all inputs in one graph call → detokenise. Attention
comes back per generated token: (target, source) for RNN decoders and (target, layers, heads,
source) for Transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from service.errors import PayloadTooLarge
from service.inference.decoding import Hypothesis, candidates_for, log_softmax, new_search, run_searches
from service.inference.device import DeviceArray, DeviceOps, TopCandidates
from service.inference.manifest import Manifest, TokenizerSpec
from service.inference.runtime import GraphSession

#: the decoder contracts whose state is a :class:`KVCache`
KV_CONTRACTS = ("transformer-kv-layers", "transformer-kv")
#: cache inputs are ``past_*``, the step returns them as ``present_*``; ``cross_*`` (from the
#: encoder) have the same layout with the source in place of the past positions
PAST, PRESENT, CROSS = "past_", "present_", "cross_"


@dataclass
class KVCache:
    """The KV-cached decoder state: the past self-attention keys and values by the step's input
    names — ``past_keys.{i}``/``past_values.{i}`` (N, heads, P, dh) per layer, or the packed
    ``past_keys``/``past_values`` (N, layers, heads, P, dh) of older repositories; positions are
    the second-to-last axis of each — and which of the P positions each row really holds (N, P).
    Rows that joined a running batch later hold fewer positions: theirs are right-aligned, the
    rest masked."""

    tensors: dict[str, np.ndarray]
    mask: np.ndarray

    def __getitem__(self, index: np.ndarray) -> KVCache:
        mask = self.mask[index]
        held = mask.any(axis=0)
        start = int(held.argmax()) if held.any() else mask.shape[1]  # drop columns nobody holds
        return KVCache(_rows_all(self.tensors, index, start=start), mask[:, start:])

    @property
    def positions(self) -> int:
        return int(self.mask.shape[1])

    @staticmethod
    def concat(caches: list[KVCache]) -> KVCache:
        """Rows of several caches in one, the shorter ones padded (masked) on the left."""
        width = max(c.positions for c in caches)
        tensors = _join_all({k: [c.tensors[k] for c in caches] for k in caches[0].tensors}, width, left=True)
        return KVCache(tensors, join([c.mask for c in caches], 1, width, left=True))


def join(arrays: list[Any], axis: int, width: int, left: bool = False) -> Any:
    """The rows (axis 0) of ``arrays`` in one array, each padded with zeros to ``width`` along
    ``axis`` — on the right, or on the left when ``left`` — in one allocation and one copy of each
    (an admission copies the whole running batch's state: this is its cost)."""
    first = arrays[0]
    if isinstance(first, DeviceArray):
        return first.ops.join(arrays, axis, width, left)
    shape = list(first.shape)
    shape[0], shape[axis] = sum(len(a) for a in arrays), width
    out = np.zeros(shape, dtype=first.dtype)
    start = 0
    for a in arrays:
        n, have = len(a), a.shape[axis]
        where: list[slice] = [slice(start, start + n)] + [slice(None)] * (a.ndim - 1)
        where[axis] = slice(width - have, width) if left else slice(0, have)
        out[tuple(where)] = a
        start += n
    return out


@dataclass
class RowBatch:
    """Decoder rows: per row its source mask, the encoder outputs the step reads (``memory``,
    cross-attention keys/values: the source runs along the second-to-last axis of each), and its
    decoder state (an RNN's hidden state, a :class:`KVCache`, or None for the whole-prefix contract).
    Indexing takes rows (a beam's reordering, finished rows leaving); :meth:`concat` joins rows of
    different batches, padding the source on the right."""

    src_mask: np.ndarray  # (N, S) bool
    tensors: dict[str, np.ndarray]
    state: Any

    def __len__(self) -> int:
        return len(self.src_mask)

    def __getitem__(self, index: np.ndarray) -> RowBatch:
        mask = self.src_mask[index]
        width = int(mask.sum(axis=1).max()) if len(mask) else 0  # drop padding nobody needs
        tensors = _rows_all(self.tensors, index, stop=width)
        return RowBatch(mask[:, :width], tensors, None if self.state is None else self.state[index])

    @staticmethod
    def concat(batches: list[RowBatch]) -> RowBatch:
        if len(batches) == 1:
            return batches[0]
        width = max(b.src_mask.shape[1] for b in batches)
        tensors = _join_all({k: [b.tensors[k] for b in batches] for k in batches[0].tensors}, width)
        states = [b.state for b in batches]
        state: Any = None
        if isinstance(states[0], KVCache):
            state = KVCache.concat(states)
        elif states[0] is not None:
            state = join(states, 1, states[0].shape[1])
        return RowBatch(join([b.src_mask for b in batches], 1, width), tensors, state)


def _empty_past(cross: Any) -> Any:
    """A cache of no positions, laid out like the cross-attention keys/values it goes with (and
    where they are)."""
    empty = np.zeros((*cross.shape[:-2], 0, cross.shape[-1]), dtype=cross.dtype)
    return cross.ops.upload(empty) if isinstance(cross, DeviceArray) else empty


def _on_device(arrays: list[Any]) -> bool:
    return len(arrays) > 1 and all(isinstance(a, DeviceArray) for a in arrays)


def _rows_all(
    tensors: dict[str, Any], index: np.ndarray, start: int = 0, stop: int | None = None
) -> dict[str, Any]:
    """Each of ``tensors``' rows ``index``, cut to ``start:stop`` along its second-to-last axis
    (source or positions) — on the device in one graph run for all of them."""
    arrays = list(tensors.values())
    if _on_device(arrays):
        axes = [a.ndim - 2 for a in arrays]
        return dict(zip(tensors, arrays[0].ops.take_all(arrays, index, axes, start, stop), strict=True))
    return {k: _rows(v, index, v.ndim - 2, stop, start) for k, v in tensors.items()}


def _join_all(groups: dict[str, list[Any]], width: int, left: bool = False) -> dict[str, Any]:
    """:func:`join` of each group (along its second-to-last axis) — on the device in one graph
    run for all groups when each joins two arrays (the running batch and its newcomers)."""
    firsts = [g[0] for g in groups.values()]
    if _on_device(firsts) and all(len(g) == 2 and _on_device(g) for g in groups.values()):
        pairs = [(g[0], g[1]) for g in groups.values()]
        axes = [a.ndim - 2 for a in firsts]
        return dict(zip(groups, firsts[0].ops.join_all(pairs, axes, width, left), strict=True))
    return {k: join(g, g[0].ndim - 2, width, left) for k, g in groups.items()}


def _rows(a: Any, index: np.ndarray, axis: int, width: int | None = None, start: int = 0) -> Any:
    """``a``'s rows ``index``, cut to ``start:width`` along ``axis``: one copy (on the device for
    a :class:`DeviceArray`)."""
    if start == 0 and (width is None or a.shape[axis] == width):
        return a[index]
    if isinstance(a, DeviceArray):
        return a.ops.take(a, index, axis, start, width)
    where: list[Any] = [index] + [slice(None)] * (a.ndim - 1)
    where[axis] = slice(start, width)
    return a[tuple(where)]


def known_ids(ids: list[int], spec: TokenizerSpec) -> list[int]:
    """Source ids the encoder has embeddings for: an id from ``vocab_size`` on (a piece an
    imported Marian tokenizer segments with, which ``vocab.json`` lacks) is ``unk_id``, as
    MarianTokenizer reads it."""
    size = spec.vocab_size
    return ids if max(ids, default=0) < size else [t if t < size else spec.unk_id for t in ids]


@dataclass
class Translation:
    text: str
    source_tokens: list[str]
    target_tokens: list[str]  # generated tokens, EOS last when it was reached
    score: float
    attention: np.ndarray  # (len(target_tokens), src_len[, ...]) — see module docstring
    finished: bool


class Translator:
    """``resident`` (default: when the graphs run on CUDA) keeps the encoder's outputs and the
    decoder state on the device between steps and picks each step's candidates there
    (``service/inference/device.py``); else they are numpy arrays on the host."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        providers: list[str],
        threads: int = 1,
        resident: bool | None = None,
        graphs: bool = True,
    ) -> None:
        """``graphs`` false: tokenisers and spec only (tokenise, build results) — the graphs are
        loaded where the model decodes, a decode process of its own
        (``service/inference/decode_process.py``)."""
        spec = manifest.translation
        if spec is None:
            raise ValueError(f"{manifest.name} is not a translation model")
        self.spec = spec
        self.name = manifest.name
        self.source_tokenizer = Tokenizer.from_file(str(directory / spec.source_tokenizer.file))
        self.target_tokenizer = Tokenizer.from_file(str(directory / spec.target_tokenizer.file))
        if not graphs:
            return
        self.encoder = GraphSession(
            directory / manifest.graphs["encoder"].file, manifest.graphs["encoder"], providers, threads
        )
        self.decoder = GraphSession(
            directory / manifest.graphs["decoder_step"].file,
            manifest.graphs["decoder_step"],
            providers,
            threads,
        )
        resident = self.decoder.on_gpu if resident is None else resident
        self.ops = DeviceOps(self.decoder.providers) if resident else None

    def tokenize(self, text: str, truncate: bool = True, field: str = "text") -> tuple[list[int], list[str]]:
        """→ source ids (EOS last) and their token strings; a text over the model's limit
        (``max_source_tokens``) is cut to it (its last token EOS), or with ``truncate`` false
        refused (:class:`PayloadTooLarge` naming ``field``: a cut text translates its beginning only)."""
        ids = known_ids(self.source_tokenizer.encode(text).ids, self.spec.source_tokenizer)
        limit = self.spec.max_source_tokens
        if len(ids) > limit:
            if not truncate:
                raise PayloadTooLarge(
                    f"{field}: {len(ids)} source tokens exceed {self.name}'s limit of {limit} "
                    "(set truncate to true to translate its first tokens only)"
                )
            ids = [*ids[: limit - 1], self.spec.source_tokenizer.eos_id]
        return ids, [self.source_tokenizer.id_to_token(t) or "" for t in ids]

    def translate(
        self, texts: list[str], beam_size: int = 1, max_length: int | None = None, length_penalty: float = 0.0
    ) -> list[Translation]:
        rows, tokens = zip(*(self.tokenize(t) for t in texts), strict=True)
        return self.translate_ids(list(rows), list(tokens), beam_size, max_length, length_penalty)

    def encode(self, rows: list[list[int]]) -> RowBatch:
        """Source ids → one decoder row per input: the encoder's outputs, padded to the longest
        input, and the decoder state of the first step."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.spec.source_tokenizer.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
        if self.ops is None:
            encoded = self.encoder.run({"src": ids, "src_mask": mask})
        else:  # what the decoder reads stays on the device
            kept = [
                o for o in self.encoder.output_names if o in self.decoder.input_names or o == "init_state"
            ]
            feeds = self.encoder.feeds({"src": ids, "src_mask": mask})
            encoded = self.ops.run(self.encoder.session, feeds, kept, [])
        state: Any = None
        if self.spec.decoder == "rnn":
            state = encoded["init_state"]
        elif self.spec.decoder in KV_CONTRACTS:
            state = KVCache(
                {name: _empty_past(encoded[CROSS + name.removeprefix(PAST)]) for name in self.past_names},
                np.zeros((len(rows), 0), dtype=bool),
            )
        tensors = {k: v for k, v in encoded.items() if k in self.decoder.input_names}
        return RowBatch(mask, tensors, state)

    @property
    def past_names(self) -> list[str]:
        """The step's cache inputs: ``past_keys.0``… (``past_mask`` is the cache's mask)."""
        return [n for n in self.decoder.input_names if n.startswith(PAST) and n != "past_mask"]

    def step(
        self,
        batch: RowBatch,
        tokens: np.ndarray,
        positions: np.ndarray,
        prefixes: np.ndarray | None,
        candidates: int = 1,
    ) -> tuple[np.ndarray | TopCandidates, np.ndarray, RowBatch]:
        """One decoder step for every row of ``batch``: each row's newest token and its position
        (0 for BOS) → log-probabilities (N, V), attention (N, ..., S) and the batch with each
        row's decoder state advanced. ``prefixes`` (N, T) only for the whole-prefix contract.
        Resident: each row's ``candidates`` best tokens (:class:`TopCandidates`) instead of the
        whole (N, V) — greedy rows need 1, a beam of b needs 2b."""
        feeds: dict[str, Any] = {"src_mask": batch.src_mask, **batch.tensors}
        contract = self.spec.decoder
        if contract == "rnn":
            feeds |= {"prev_tokens": tokens, "state": batch.state, "step": positions}
        elif contract == "transformer":
            feeds["tokens"] = prefixes
        else:
            cache: KVCache = batch.state
            feeds |= {"tokens": tokens, "positions": positions, "past_mask": cache.mask, **cache.tensors}
        if self.ops is None:
            out = self.decoder.run(feeds)
        else:
            host = ["attention" if contract == "rnn" else "cross_attention"]
            resident = [o for o in self.decoder.output_names if o not in host]
            out = self.ops.run(self.decoder.session, self.decoder.feeds(feeds), resident, host)
        state: Any = None
        if contract == "rnn":
            state = out["new_state"]
        elif contract in KV_CONTRACTS:
            now = np.ones((len(tokens), 1), dtype=bool)
            present = {PAST + k.removeprefix(PRESENT): v for k, v in out.items() if k.startswith(PRESENT)}
            state = KVCache(present, np.concatenate([cache.mask, now], axis=1))
        attention = out["attention"] if contract == "rnn" else out["cross_attention"]
        attention = attention.astype(np.float32, copy=False)  # an fp16 graph's maps, as every answer's
        logits = out["logits"]
        logp = logits.ops.top(logits, candidates) if isinstance(logits, DeviceArray) else log_softmax(logits)
        return logp, attention, RowBatch(batch.src_mask, batch.tensors, state)

    def translate_ids(
        self,
        rows: list[list[int]],
        source_tokens: list[list[str]],
        beam_size: int = 1,
        max_length: int | None = None,
        length_penalty: float = 0.0,
    ) -> list[Translation]:
        """One padded batch through the encoder, then batched greedy/beam search."""
        tgt = self.spec.target_tokenizer

        k = candidates_for(beam_size)

        def step(owners: np.ndarray, prefixes: np.ndarray, batch: RowBatch, t: int):
            return self.step(batch, prefixes[:, -1], np.full(len(owners), t, dtype=np.int64), prefixes, k)

        limit = self.target_limit(max_length)
        searches = [
            new_search(tgt.bos_id, tgt.eos_id, limit, beam_size, length_penalty, len(r)) for r in rows
        ]
        hyps = run_searches(step, searches, self.encode(rows))
        return [self.result(h, toks) for h, toks in zip(hyps, source_tokens, strict=True)]

    def warmup(self) -> None:
        """Two short texts through both graphs, beam 2, so the first request pays no first-run cost."""
        self.translate(["warm-up 1", "warm up two"], beam_size=2, max_length=4)

    def target_limit(self, max_length: int | None) -> int:
        return min(max_length or self.spec.max_target_tokens, self.spec.max_target_tokens)

    def result(self, hyp: Hypothesis, source_tokens: list[str]) -> Translation:
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
