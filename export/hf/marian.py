"""MarianMT translation checkpoints as the service's ``transformer-kv-layers`` encoder + decoder-step graphs.

Marian (Junczys-Dowmunt et al. 2018) is a post-norm Transformer (Vaswani et al. 2017) with scaled
embeddings, sinusoidal positions whose cos half follows the sin half, a ``final_logits_bias``,
and ``decoder_start_token_id`` = ``<pad>``. Rather than re-implement any of that, the two graphs
wrap the checkpoint's own modules (loaded with ``attn_implementation="eager"``, so attention
probabilities exist as tensors) into the contract of ``export/graphs.py``'s :func:`seq2seq_kv_plans`:

* ``encoder``: ``src``, ``src_mask`` (B, S) → ``memory`` (B, S, D) — ``model.model.encoder`` —
  and each decoder layer's cross-attention keys/values (its ``encoder_attn.k_proj``/``v_proj``
  of the memory, (B, heads, S, dh) per layer);
* ``decoder_step``: one new token per row with its position and each layer's cached
  self-attention keys/values → ``logits`` (``lm_head`` + ``final_logits_bias``), the present
  keys/values and the step's ``cross_attention`` (B, layers, heads, S). The step runs the
  checkpoint's own decoder layers' projections and norms in Marian's post-norm order with the
  cache written out (transformers' ``Cache`` objects do not export); :func:`verify_against_transformers`
  proves it equals ``MarianMTModel.forward`` on the whole prefix.

The service's decoders start every prefix with the target tokenizer's ``bos_id``; the manifest
sets it to ``decoder_start_token_id``. Tokens the generation config bans outright
(``bad_words_ids`` of one token — ``<pad>`` in every OPUS-MT checkpoint) get the logit
:data:`BANNED` in the graph, which is what ``generate`` does with its ``NoBadWordsLogitsProcessor``
(there ``-inf``; finite here so that parity differences stay finite).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, MarianMTModel

from export.graphs import SEQ_SHAPES, GraphPlan, seq2seq_kv_plans
from export.hf.errors import UnsupportedCheckpoint, read_json
from export.hf.loading import pretrained
from export.hf.spm import marian_tokenizer, read_vocab
from export.models.transformer import padding_bias
from export.onnx_export import TOLERANCE, ExportVerificationError
from service.inference.manifest import TokenizerSpec, TranslationSpec

log = logging.getLogger(__name__)
ARCHITECTURES = {"MarianMTModel": "hf-marian"}
BANNED = -1e9  # a logit no token with it can win; finite, so parity diffs stay finite
SOURCE_TOKENIZER, TARGET_TOKENIZER = "source_tokenizer.json", "target_tokenizer.json"


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, D) → (B, heads, T, dh)."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Marian's eager attention, written out: → output (B, T, D), probabilities (B, heads, T, S)."""
    probs = torch.softmax(q @ k.transpose(-1, -2) * scaling + bias, dim=-1)
    return (probs @ v).transpose(1, 2).flatten(2), probs


class MarianKV(nn.Module):
    """The checkpoint's modules as ``encode_kv`` and ``step_kv`` (the stages of
    ``export/graphs.py``'s :func:`seq2seq_kv_plans`), with per-layer caches."""

    final_logits_bias: Tensor
    banned: Tensor  # (V,) bool: tokens whose logit is BANNED

    def __init__(self, model: MarianMTModel, banned: list[int]) -> None:
        super().__init__()
        self.encoder: Any = model.model.encoder
        self.decoder: Any = model.model.decoder
        self.lm_head = model.lm_head
        self.heads = int(model.config.decoder_attention_heads)
        self.register_buffer("final_logits_bias", model.final_logits_bias, persistent=False)  # (1, V)
        self.register_buffer("banned", ban_mask(model, banned), persistent=False)

    def encode_kv(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """src, src_mask (B, S) → memory (B, S, D), each decoder layer's cross keys and values
        (B, heads, S, dh)."""
        memory = self.encoder(input_ids=src, attention_mask=src_mask.long()).last_hidden_state
        layers = self.decoder.layers
        keys = [_heads(layer.encoder_attn.k_proj(memory), self.heads) for layer in layers]
        values = [_heads(layer.encoder_attn.v_proj(memory), self.heads) for layer in layers]
        return memory, keys, values

    def step_kv(
        self, tokens: Tensor, positions: Tensor, past_keys: list[Tensor], past_values: list[Tensor],
        past_mask: Tensor, cross_keys: list[Tensor], cross_values: list[Tensor], src_mask: Tensor,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:  # fmt: skip
        """One step over the per-layer caches (see ``Transformer.step_kv``)."""
        dec = self.decoder
        x = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions.weight[positions]  # (B, D)
        x = x[:, None]  # (B, 1, D)
        now = torch.ones_like(tokens, dtype=torch.bool)[:, None]
        self_bias, src_bias = padding_bias(torch.cat([past_mask, now], dim=1)), padding_bias(src_mask)
        keys, values, cross = [], [], []
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            k = torch.cat([past_keys[i], _heads(attn.k_proj(x), self.heads)], dim=2)
            v = torch.cat([past_values[i], _heads(attn.v_proj(x), self.heads)], dim=2)
            out, _ = _attend(_heads(attn.q_proj(x), self.heads), k, v, self_bias, attn.scaling)
            x = layer.self_attn_layer_norm(x + attn.out_proj(out))
            ca = layer.encoder_attn
            q = _heads(ca.q_proj(x), self.heads)
            out, probs = _attend(q, cross_keys[i], cross_values[i], src_bias, ca.scaling)
            x = layer.encoder_attn_layer_norm(x + ca.out_proj(out))
            x = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
            keys.append(k)
            values.append(v)
            cross.append(probs[:, :, 0])
        logits = self.lm_head(x[:, 0]) + self.final_logits_bias  # (B, V)
        logits = logits.masked_fill(self.banned, BANNED)
        return logits, keys, values, torch.stack(cross, dim=1)


def ban_mask(model: MarianMTModel, banned: list[int]) -> Tensor:
    mask = torch.zeros(model.final_logits_bias.shape[-1], dtype=torch.bool)
    mask[banned] = True
    return mask


def load(checkpoint: Path) -> MarianMTModel:
    model: MarianMTModel = pretrained(MarianMTModel, checkpoint)
    return model


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
    heads = cfg.decoder_attention_heads
    return seq2seq_kv_plans(
        MarianKV(model, banned), cfg.vocab_size, vocab, cfg.decoder_layers, heads, cfg.d_model // heads
    )


def verify_against_transformers(model: MarianMTModel, graph_plans: list[GraphPlan]) -> float:
    """The wrapped stages, the step fed one token at a time over its own cache, equal
    ``MarianMTModel.forward`` on the whole prefix (logits and every layer's cross-attention at
    every position) — so the graphs, which are verified against the stages, are verified against
    transformers. Returns the worst |diff|."""
    stages: Any = graph_plans[0].module.model  # the MarianKV both graph plans wrap
    worst = 0.0
    for i, shape in enumerate(SEQ_SHAPES):
        gen = torch.Generator().manual_seed(200 + i)
        src, mask = graph_plans[0].make_inputs(shape, gen)
        b, length = src.shape[0], shape["tgt_len"]
        vocab = int(model.final_logits_bias.shape[-1])
        tokens = torch.randint(4, vocab, (b, length), generator=gen)
        with torch.no_grad():
            _, cross_keys, cross_values = stages.encode_kv(src, mask)
            keys = [torch.zeros(*k.shape[:2], 0, k.shape[-1]) for k in cross_keys]
            values, past = keys, torch.zeros(b, 0, dtype=torch.bool)
            logits, cross = [], []
            for t in range(length):
                out, keys, values, attn = stages.step_kv(
                    tokens[:, t], torch.full((b,), t), keys, values, past, cross_keys, cross_values, mask
                )
                past = torch.cat([past, torch.ones(b, 1, dtype=torch.bool)], dim=1)
                logits.append(out)
                cross.append(attn)
            ref = model(
                input_ids=src, attention_mask=mask.long(), decoder_input_ids=tokens, output_attentions=True
            )
        want_logits = ref.logits.masked_fill(stages.banned, BANNED)  # what NoBadWords does, finite
        want_cross = torch.stack(ref.cross_attentions, dim=1)  # (B, layers, heads, T, S)
        got_logits, got_cross = torch.stack(logits, dim=1), torch.stack(cross, dim=3)
        diff = max(float((got_logits - want_logits).abs().max()), float((got_cross - want_cross).abs().max()))
        worst = max(worst, diff)
        if not diff <= TOLERANCE:
            raise ExportVerificationError(f"encoder + decoder_step differ from MarianMTModel by {diff:.2e}")
    return worst


def translation_spec(model: MarianMTModel, checkpoint: Path, staging: Path) -> TranslationSpec:
    """Writes both tokenizers into ``staging`` and returns the manifest's translation section."""
    cfg: Any = model.config
    generation = model.generation_config
    tok_cfg: dict[str, Any] = read_json(checkpoint / "tokenizer_config.json", default={})
    specials = {
        k: _token_text(tok_cfg.get(f"{k}_token"), d)
        for k, d in (("unk", "<unk>"), ("eos", "</s>"), ("pad", "<pad>"))
    }
    source_vocab = read_vocab(checkpoint / "vocab.json", specials)
    target_vocab = (
        read_vocab(checkpoint / "target_vocab.json", specials)
        if tok_cfg.get("separate_vocabs")
        else source_vocab
    )
    sides = {}
    for file, spm_file, vocab, source in (
        (SOURCE_TOKENIZER, "source.spm", source_vocab, True),
        (TARGET_TOKENIZER, "target.spm", target_vocab, False),
    ):
        marian_tokenizer(checkpoint / spm_file, vocab, specials, source).save(str(staging / file))
        # the source side's ids are its own vocabulary's (the tokenizer just written ends every
        # text with that ``</s>``; a separate target vocabulary may number it differently); the
        # target side's are the model's, which generation decodes with
        eos = _single(generation.eos_token_id if generation.eos_token_id is not None else cfg.eos_token_id)
        sides[file] = TokenizerSpec(
            file=file,
            pad_id=vocab[specials["pad"]] if source else cfg.pad_token_id,
            bos_id=cfg.decoder_start_token_id,  # the first token of every decoder prefix
            eos_id=vocab[specials["eos"]] if source else eos,
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
        decoder="transformer-kv-layers",
        max_source_tokens=min(int(tok_cfg.get("model_max_length") or positions), positions),
        # generate's max_length counts the start token; the service's limit counts generated ones
        max_target_tokens=min((generation.max_length or positions) - 1, positions - 1),
        num_layers=cfg.decoder_layers,
        num_heads=cfg.decoder_attention_heads,
    )


def _token_text(value: Any, default: str) -> str:
    """A special token of ``tokenizer_config.json``: a string, or the ``AddedToken`` object older
    transformers versions save (``{"__type": "AddedToken", "content": "<unk>", …}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return str(value) if value else default


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
