"""MarianMT translation checkpoints as the service's ``transformer`` encoder + decoder-step graphs.

Marian (Junczys-Dowmunt et al. 2018) is a post-norm Transformer (Vaswani et al. 2017) with scaled
embeddings, sinusoidal positions whose cos half follows the sin half, a ``final_logits_bias``,
and ``decoder_start_token_id`` = ``<pad>``. Rather than re-implement any of that, the two graphs
wrap the checkpoint's own modules (loaded with ``attn_implementation="eager"``, so attention
probabilities exist as tensors) into the contract of ``export/graphs.py``'s :func:`seq2seq_plans`:

* ``encoder``: ``src``, ``src_mask`` (B, S) → ``memory`` (B, S, D) — ``model.model.encoder``;
* ``decoder_step``: the whole prefix ``tokens`` (B, T), ``memory``, ``src_mask`` →
  ``logits`` of the last position (``lm_head`` + ``final_logits_bias``) and its
  ``cross_attention`` (B, layers, heads, S) from ``model.model.decoder(output_attentions=True)``.

The service's decoders start every prefix with the target tokenizer's ``bos_id``; the manifest
sets it to ``decoder_start_token_id``. Tokens the generation config bans outright
(``bad_words_ids`` of one token — ``<pad>`` in every OPUS-MT checkpoint) get the logit
:data:`BANNED` in the graph, which is what ``generate`` does with its ``NoBadWordsLogitsProcessor``
(there ``-inf``; finite here so that parity differences stay finite).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, MarianMTModel

from export.graphs import SEQ_SHAPES, GraphPlan, seq2seq_plans
from export.hf.errors import UnsupportedCheckpoint
from export.hf.spm import marian_tokenizer, read_vocab
from export.onnx_export import TOLERANCE, ExportVerificationError
from service.inference.manifest import TokenizerSpec, TranslationSpec

log = logging.getLogger(__name__)
ARCHITECTURES = {"MarianMTModel": "hf-marian"}
BANNED = -1e9  # a logit no token with it can win; finite, so parity diffs stay finite
SOURCE_TOKENIZER, TARGET_TOKENIZER = "source_tokenizer.json", "target_tokenizer.json"


class MarianEncode(nn.Module):
    def __init__(self, model: MarianMTModel) -> None:
        super().__init__()
        self.encoder: Any = model.model.encoder

    def forward(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """src, src_mask (B, S) → memory (B, S, D)."""
        return self.encoder(input_ids=src, attention_mask=src_mask.long()).last_hidden_state


class MarianStep(nn.Module):
    final_logits_bias: Tensor
    banned: Tensor  # (V,) bool: tokens whose logit is BANNED

    def __init__(self, model: MarianMTModel, banned: list[int]) -> None:
        super().__init__()
        self.decoder: Any = model.model.decoder
        self.lm_head = model.lm_head
        self.register_buffer("final_logits_bias", model.final_logits_bias, persistent=False)  # (1, V)
        self.register_buffer("banned", ban_mask(model, banned), persistent=False)

    def forward(self, tokens: Tensor, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Prefix (B, T) → logits of its last position (B, V), cross-attention (B, layers, heads, S)."""
        out = self.decoder(
            input_ids=tokens,
            encoder_hidden_states=memory,
            encoder_attention_mask=src_mask.long(),
            output_attentions=True,
            use_cache=False,
        )
        logits = self.lm_head(out.last_hidden_state[:, -1]) + self.final_logits_bias  # (B, V)
        logits = logits.masked_fill(self.banned, BANNED)  # exactly BANNED: no rounding at 1e9
        cross = torch.stack(out.cross_attentions, dim=1)  # (B, layers, heads, T, S)
        return logits, cross[:, :, :, -1]


def ban_mask(model: MarianMTModel, banned: list[int]) -> Tensor:
    mask = torch.zeros(model.final_logits_bias.shape[-1], dtype=torch.bool)
    mask[banned] = True
    return mask


def load(checkpoint: Path) -> MarianMTModel:
    model = MarianMTModel.from_pretrained(checkpoint, attn_implementation="eager", use_safetensors=True)
    return model.eval()


def banned_tokens(generation: GenerationConfig) -> list[int]:
    """Single-token ``bad_words_ids`` (longer banned sequences are not expressible in a step graph)."""
    words = generation.bad_words_ids or []
    longer = [w for w in words if len(w) != 1]
    if longer:
        log.warning("bad_words_ids of more than one token are not reproduced: %s", longer)
    return sorted({w[0] for w in words if len(w) == 1})


def plans(model: MarianMTModel, banned: list[int]) -> list[GraphPlan]:
    cfg: Any = model.config
    vocab = cfg.decoder_vocab_size or cfg.vocab_size
    return seq2seq_plans(MarianEncode(model), MarianStep(model, banned), cfg.vocab_size, vocab, cfg.d_model)


def verify_against_transformers(model: MarianMTModel, graph_plans: list[GraphPlan]) -> float:
    """The two wrapped stages, chained, equal ``MarianMTModel.forward`` (logits of the last
    position and the cross-attention of every layer) — so the graphs, which are verified against
    the stages, are verified against transformers. Returns the worst |diff|."""
    encode, step = (p.module for p in graph_plans)
    worst = 0.0
    for i, shape in enumerate(SEQ_SHAPES):
        gen = torch.Generator().manual_seed(200 + i)
        src, mask = graph_plans[0].make_inputs(shape, gen)
        tokens = graph_plans[1].make_inputs(shape, gen)[0]
        with torch.no_grad():
            logits, cross = step(tokens, encode(src, mask), mask)
            ref = model(
                input_ids=src, attention_mask=mask.long(), decoder_input_ids=tokens, output_attentions=True
            )
        want_logits = ref.logits[:, -1].masked_fill(step.banned, BANNED)  # what NoBadWords does, finite
        want_cross = torch.stack(ref.cross_attentions, dim=1)[:, :, :, -1]
        diff = max(float((logits - want_logits).abs().max()), float((cross - want_cross).abs().max()))
        worst = max(worst, diff)
        if not diff <= TOLERANCE:
            raise ExportVerificationError(f"encoder + decoder_step differ from MarianMTModel by {diff:.2e}")
    return worst


def translation_spec(model: MarianMTModel, checkpoint: Path, staging: Path) -> TranslationSpec:
    """Writes both tokenizers into ``staging`` and returns the manifest's translation section."""
    cfg: Any = model.config
    generation = model.generation_config
    tok_cfg = _read_json(checkpoint / "tokenizer_config.json")
    specials = {
        k: str(tok_cfg.get(f"{k}_token") or d)
        for k, d in (("unk", "<unk>"), ("eos", "</s>"), ("pad", "<pad>"))
    }
    source_vocab = read_vocab(checkpoint / "vocab.json")
    target_vocab = (
        read_vocab(checkpoint / "target_vocab.json") if tok_cfg.get("separate_vocabs") else source_vocab
    )
    sides = {}
    for file, spm_file, vocab, source in (
        (SOURCE_TOKENIZER, "source.spm", source_vocab, True),
        (TARGET_TOKENIZER, "target.spm", target_vocab, False),
    ):
        marian_tokenizer(checkpoint / spm_file, vocab, specials, source).save(str(staging / file))
        sides[file] = TokenizerSpec(
            file=file,
            pad_id=cfg.pad_token_id,
            bos_id=cfg.decoder_start_token_id,  # the first token of every decoder prefix
            eos_id=_single(
                generation.eos_token_id if generation.eos_token_id is not None else cfg.eos_token_id
            ),
            unk_id=vocab[specials["unk"]],
            vocab_size=len(vocab),
        )
    source_lang, target_lang = _languages(checkpoint, tok_cfg)
    positions = cfg.max_position_embeddings
    return TranslationSpec(
        source_language=source_lang,
        target_language=target_lang,
        source_tokenizer=sides[SOURCE_TOKENIZER],
        target_tokenizer=sides[TARGET_TOKENIZER],
        decoder="transformer",
        max_source_tokens=min(int(tok_cfg.get("model_max_length") or positions), positions),
        # generate's max_length counts the start token; the service's limit counts generated ones
        max_target_tokens=min((generation.max_length or positions) - 1, positions - 1),
        num_layers=cfg.decoder_layers,
        num_heads=cfg.decoder_attention_heads,
    )


def _single(value: int | list[int]) -> int:
    if isinstance(value, list):
        if len(value) != 1:
            raise UnsupportedCheckpoint(
                f"the service's decoders stop on one eos id, the checkpoint has {value}"
            )
        return value[0]
    return value


def _languages(checkpoint: Path, tok_cfg: dict[str, Any]) -> tuple[str, str]:
    """``source_lang``/``target_lang`` of the tokenizer config, else an ``opus-mt-xx-yy`` name."""
    match = re.search(r"opus-mt-([A-Za-z_]+)-([A-Za-z_]+)$", checkpoint.resolve().name)
    fallback = match.groups() if match else ("source", "target")
    return str(tok_cfg.get("source_lang") or fallback[0]), str(tok_cfg.get("target_lang") or fallback[1])


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return data
