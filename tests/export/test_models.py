"""The model families: shapes, attention as real distributions, the RNN scorers' windows."""

from __future__ import annotations

import pytest
import torch

from export.models import REGISTRY, build_model
from export.models.rnn import SCORERS, reverse_within_length

torch.manual_seed(0)
SRC_VOCAB, TGT_VOCAB = 20, 12


def tiny_seq2seq(family: str) -> torch.nn.Module:
    if family == "transformer":
        cfg = {"d_model": 16, "heads": 2, "ff_dim": 32, "enc_layers": 1, "dec_layers": 2, "max_len": 32}
    else:
        cfg = {"emb_dim": 8, "enc_hidden": 8, "window": 2}
    return build_model(family, {**cfg, "src_vocab": SRC_VOCAB, "tgt_vocab": TGT_VOCAB, "dropout": 0.0}).eval()


def batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    src = torch.randint(4, SRC_VOCAB, (len(lengths), width)) * mask
    return src, mask


def test_registry_has_every_family() -> None:
    assert {f"rnn-{s}" for s in SCORERS} | {"transformer", "vit"} == set(REGISTRY)


def test_reverse_within_length_keeps_padding_in_place() -> None:
    x = torch.arange(8.0).view(2, 4, 1)
    out = reverse_within_length(x, torch.tensor([4, 2]))
    assert out[:, :, 0].tolist() == [[3, 2, 1, 0], [5, 4, 6, 7]]


@pytest.mark.parametrize("family", [f"rnn-{s}" for s in SCORERS] + ["transformer"])
def test_seq2seq_attention_is_a_distribution_over_real_tokens(family: str) -> None:
    model = tiny_seq2seq(family)
    src, mask = batch([7, 3, 5])
    tgt_in = torch.randint(4, TGT_VOCAB, (3, 6))
    with torch.no_grad():
        logits, attn = model(src, mask, tgt_in)
    assert logits.shape == (3, 6, TGT_VOCAB)
    assert attn.shape == (3, 6, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 6))
    assert float(attn.masked_select(~mask[:, None, :].expand_as(attn)).abs().max()) < 1e-6


def test_rnn_encoder_ignores_padding() -> None:
    """A row's memory must not depend on how much padding the batch adds after it."""
    model = tiny_seq2seq("rnn-additive")
    src, mask = batch([5])
    padded, pmask = (
        torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], 1),
        torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], 1),
    )
    with torch.no_grad():
        m1, h1 = model.encode(src, mask)
        m2, h2 = model.encode(padded, pmask)
    torch.testing.assert_close(m1, m2[:, :5])
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("scorer", ["local-m", "local-p"])
def test_local_attention_stays_inside_its_window(scorer: str) -> None:
    model = tiny_seq2seq(f"rnn-{scorer}")
    d = model.cfg.window
    src, mask = batch([12, 12])
    memory, state = model.encode(src, mask)
    with torch.no_grad():
        for t in range(6):
            step = torch.full((2,), t)
            _, state, weights = model.step(torch.full((2,), 5), state, memory, mask, step)
            support = (weights > 1e-6).nonzero()[:, 1]
            assert int(support.max() - support.min()) <= 2 * d
            if scorer == "local-m":  # the window is centred on p_t = t
                assert set(support.tolist()) <= set(range(max(0, t - d), t + d + 1))
            torch.testing.assert_close(weights.sum(-1), torch.ones(2))


def test_transformer_step_matches_full_decode() -> None:
    model = tiny_seq2seq("transformer")
    src, mask = batch([6, 4])
    tokens = torch.randint(4, TGT_VOCAB, (2, 5))
    with torch.no_grad():
        memory = model.encode(src, mask)
        logits, cross = model.decode(tokens, memory, mask)
        step_logits, step_cross = model.step(tokens[:, :3], memory, mask)
    torch.testing.assert_close(step_logits, logits[:, 2])
    torch.testing.assert_close(step_cross, cross[:, :, :, 2])
    assert step_cross.shape == (2, 2, 2, 6)  # (B, layers, heads, S)


def test_vit_returns_every_layers_attention() -> None:
    model = build_model(
        "vit", {"image_size": 16, "patch_size": 4, "dim": 16, "depth": 3, "heads": 2, "mlp_dim": 32}
    )
    with torch.no_grad():
        logits, attn = model(torch.randn(2, 1, 16, 16))
    assert logits.shape == (2, 10)
    assert attn.shape == (2, 3, 2, 17, 17)  # (B, layers, heads, 1 + patches, 1 + patches)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 2, 17))


def test_a_local_window_that_cannot_work_is_refused() -> None:
    """local-p's Gaussian has sigma = D / 2: D = 0 made every weight NaN, with no word of why.
    local-m's D = 0 is a hard monotonic alignment (all weight on p_t = t) and stays allowed."""
    sizes = {"src_vocab": 8, "tgt_vocab": 8}
    for scorer, window in (("local-p", 0), ("local-p", -1), ("local-m", -1)):
        with pytest.raises(ValueError, match="window"):
            build_model(f"rnn-{scorer}", {**sizes, "window": window})
    model = build_model("rnn-local-m", {**sizes, "window": 0}).eval()
    src, mask = torch.randint(4, 8, (1, 5)), torch.ones(1, 5, dtype=torch.bool)
    memory, state = model.encode(src, mask)
    with torch.no_grad():
        for t in range(3):
            _, state, weights = model.step(torch.full((1,), 5), state, memory, mask, torch.full((1,), t))
            torch.testing.assert_close(weights, torch.nn.functional.one_hot(torch.tensor([t]), 5).float())
    assert build_model("rnn-dot", {**sizes, "window": 0})  # no window there


def test_a_transformer_recipe_with_limits_past_its_positions_is_refused() -> None:
    """Source or target limits past ``max_len`` exported cleanly, then every longer request failed
    inside ONNX Runtime."""
    import dataclasses

    from export.recipes import RECIPES

    recipe = RECIPES["dates-transformer"]
    with pytest.raises(ValueError, match="max_source_tokens=80 exceeds the model's max_len=64"):
        dataclasses.replace(recipe, model={**recipe.model, "max_len": 64}, max_source_tokens=80)
    with pytest.raises(ValueError, match="max_target_tokens=200 exceeds the model's max_len=128"):
        dataclasses.replace(recipe, model={k: v for k, v in recipe.model.items() if k != "max_len"},
                            max_target_tokens=200)  # fmt: skip
