"""The resident decoder loop (``service/inference/device.py``): state that stays on the execution
provider's device between steps. Run here on the CPU provider — the same code as on CUDA, with
``OrtValue``s in host memory — against the numpy loop: the row operations equal numpy's, and whole
decodes, alone and under the scheduler's mixed traffic, give the same answers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from service.inference.decoding import Options, log_softmax
from service.inference.device import DeviceOps
from service.inference.manifest import Manifest
from service.inference.scheduler import TranslationScheduler
from service.inference.translation import KVCache, RowBatch, Translator, join

CPU = ["CPUExecutionProvider"]
TEXTS = [
    "3 mars 2011",
    "Saturday, January 22, 1994",
    "1. Dezember 1987",
    "el 7 de julio de 2020",
    "9/9/86",
    "the twenty-first of June, nineteen hundred and ninety-nine",
]


@pytest.fixture(scope="module")
def ops() -> DeviceOps:
    return DeviceOps(CPU)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_row_operations_equal_numpys(ops: DeviceOps, dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 4, 3)).astype(dtype)
    y = rng.standard_normal((2, 2, 7, 3)).astype(dtype)
    index = np.array([3, 0, 0, 4])
    assert np.array_equal(ops.upload(x)[index].numpy(), x[index])
    assert np.array_equal(ops.take(ops.upload(x), index, 2, 1).numpy(), x[index][:, :, 1:])
    assert np.array_equal(ops.take(ops.upload(x), index, 2, 0, 2).numpy(), x[index][:, :, :2])
    for left in (False, True):
        got = ops.join([ops.upload(x), ops.upload(y)], 2, 9, left).numpy()
        assert np.array_equal(got, join([x, y], 2, 9, left))
        assert np.array_equal(ops.join([ops.upload(x)], 2, 6, left).numpy(), join([x], 2, 6, left))
    cache = KVCache({"past_keys.0": ops.upload(x)}, rng.random((5, 4)) > 0.5)
    host = KVCache({"past_keys.0": x}, cache.mask)
    for rows in (np.array([1, 2]), np.array([4, 4, 0])):
        assert np.array_equal(cache[rows].tensors["past_keys.0"].numpy(), host[rows].tensors["past_keys.0"])


def test_top_candidates_are_the_best_log_probabilities_ties_to_the_lower_id(ops: DeviceOps) -> None:
    rng = np.random.default_rng(1)
    logits = np.round(rng.standard_normal((6, 40)), 1).astype(np.float32)  # many ties
    logits[0, 9] = logits[0, 3] = 9.0
    for dtype in (np.float32, np.float16):
        top = ops.top(ops.upload(logits.astype(dtype)), 5)
        assert top.logp.dtype == np.float32 and top.ids.shape == (6, 5)
        full = log_softmax(logits.astype(dtype))
        order = np.argsort(-full, axis=1, kind="stable")[:, :5]
        assert np.array_equal(top.ids, order)
        np.testing.assert_allclose(top.logp, np.take_along_axis(full, order, 1), atol=1e-5)
    assert list(ops.top(ops.upload(logits), 1).ids[0]) == [3]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dates-transformer", "dates-bahdanau"])
@pytest.mark.parametrize("beam", [1, 3])
def test_resident_decodes_equal_the_numpy_loop(tiny_repository: Path, name: str, beam: int) -> None:
    directory = tiny_repository / name / "1"
    manifest = Manifest.load(directory)
    host = Translator(directory, manifest, CPU)
    resident = Translator(directory, manifest, CPU, resident=True)
    assert host.ops is None and resident.ops is not None
    for a, b in zip(host.translate(TEXTS, beam), resident.translate(TEXTS, beam), strict=True):
        assert a.target_tokens == b.target_tokens
        assert a.score == pytest.approx(b.score, abs=1e-4)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dates-transformer", "dates-bahdanau"])
def test_the_scheduler_on_a_resident_decoder_answers_each_text_as_alone(
    tiny_repository: Path, name: str
) -> None:
    """Greedy and beam requests arriving at different steps: rows join (Pad + Concat on the
    device), reorder and leave (Gather), padding is cut (Slice) — every answer equals that text
    decoded alone by the numpy loop."""
    directory = tiny_repository / name / "1"
    manifest = Manifest.load(directory)
    host = Translator(directory, manifest, CPU)
    resident = Translator(directory, manifest, CPU, resident=True)
    spec = manifest.translation
    assert spec is not None
    tgt = spec.target_tokenizer
    rng = random.Random(0)
    jobs = [
        ([rng.choice(TEXTS) for _ in range(rng.randint(1, 3))], rng.choice([1, 1, 2, 3])) for _ in range(24)
    ]

    async def run() -> list:
        scheduler = TranslationScheduler(resident, token_budget=4000)

        async def one(texts: list[str], beam: int):
            await asyncio.sleep(rng.random() * 0.05)
            ids = [resident.tokenize(t)[0] for t in texts]
            return await scheduler.submit(ids, Options(tgt.bos_id, tgt.eos_id, spec.max_target_tokens, beam))

        answers = await asyncio.gather(*(one(t, b) for t, b in jobs))
        scheduler.close()
        return answers

    answers = asyncio.run(asyncio.wait_for(run(), 120))
    assert max(a.mean_rows for a in answers) > 2  # requests really shared steps
    for (texts, beam), answer in zip(jobs, answers, strict=True):
        for text, hyp in zip(texts, answer.hypotheses, strict=True):
            [alone] = host.translate([text], beam)
            assert host.result(hyp, alone.source_tokens).target_tokens == alone.target_tokens
            assert hyp.score == pytest.approx(alone.score, abs=1e-4)
            np.testing.assert_allclose(
                hyp.attention[..., : len(alone.source_tokens)], alone.attention, atol=1e-5
            )


def test_rows_of_a_resident_batch_stay_device_arrays(ops: DeviceOps) -> None:
    """A batch's encoder outputs and state keep living on the device through index and concat."""
    x = ops.upload(np.ones((3, 4, 2), dtype=np.float32))
    state = ops.upload(np.arange(6, dtype=np.float32).reshape(3, 2))
    batch = RowBatch(np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=bool), {"memory": x}, state)
    kept = batch[np.array([0, 2])]
    assert kept.tensors["memory"].shape == (2, 2, 2)  # the padding nobody holds is cut
    joined = RowBatch.concat([kept, batch])
    assert joined.tensors["memory"].shape == (5, 4, 2) and joined.state.shape == (5, 2)
    assert np.array_equal(joined.state.numpy(), np.concatenate([state.numpy()[[0, 2]], state.numpy()]))


def test_a_batchs_tensors_move_in_one_graph_run_each_as_alone(ops: DeviceOps) -> None:
    """take_all / join_all (a batch's dozen state tensors in one run, not one run each) give what
    take / join give array by array — arrays of other dtypes and ranks together — and a
    multi-tensor batch and cache index and join on the device as on the host."""
    rng = np.random.default_rng(1)
    xs = [
        rng.standard_normal((5, 2, 4, 3)).astype(np.float32),
        rng.standard_normal((5, 6, 3)).astype(np.float16),
    ]
    ys = [
        rng.standard_normal((2, 2, 7, 3)).astype(np.float32),
        rng.standard_normal((2, 6, 3)).astype(np.float16),
    ]
    index = np.array([4, 0, 0, 2])
    for start, stop in ((0, None), (1, 3)):
        got = ops.take_all([ops.upload(x) for x in xs], index, [2, 1], start, stop)
        for x, g, axis in zip(xs, got, (2, 1), strict=True):
            assert np.array_equal(g.numpy(), ops.take(ops.upload(x), index, axis, start, stop).numpy())
    for left in (False, True):
        pairs = [(ops.upload(xs[0]), ops.upload(ys[0])), (ops.upload(xs[1][:, :4]), ops.upload(ys[1]))]
        got = ops.join_all(pairs, [2, 1], 9, left)
        assert np.array_equal(got[0].numpy(), join([xs[0], ys[0]], 2, 9, left))
        assert np.array_equal(got[1].numpy(), join([xs[1][:, :4], ys[1]], 1, 9, left))
    mask = rng.random((5, 4)) > 0.3
    mask[:, -1] = True
    names = ["past_keys.0", "past_values.0", "past_keys.1"]
    host = KVCache({n: rng.standard_normal((5, 2, 4, 3)).astype(np.float32) for n in names}, mask)
    device = KVCache({n: ops.upload(v) for n, v in host.tensors.items()}, mask)
    src = np.ones((5, 3), dtype=bool)
    src[0, 2] = False
    cross = {
        f"cross_{n}": rng.standard_normal((5, 2, 3, 3)).astype(np.float32) for n in ("keys.0", "values.0")
    }
    on_host = RowBatch(src, cross, host)
    on_device = RowBatch(src, {n: ops.upload(v) for n, v in cross.items()}, device)
    for rows in (np.array([0]), np.array([3, 1, 1])):
        a, b = on_host[rows], on_device[rows]
        joined_host, joined_device = RowBatch.concat([on_host, a]), RowBatch.concat([on_device, b])
        for h, d in ((a, b), (joined_host, joined_device)):
            assert np.array_equal(h.src_mask, d.src_mask) and np.array_equal(h.state.mask, d.state.mask)
            for n in h.tensors:
                assert np.array_equal(h.tensors[n], d.tensors[n].numpy())
            for n in h.state.tensors:
                assert np.array_equal(h.state.tensors[n], d.state.tensors[n].numpy())
