"""seqio Tasks, the temperature Mixture, and the batches the trainer receives."""

import math

import numpy as np
import pytest

from jaxmt.data import embedded, vocab

seqio = pytest.importorskip("seqio")
from jaxmt.data import pipeline, tasks  # noqa: E402  (after the seqio check)

LANGS = ("en", "de", "ru")
SRC_LEN = TGT_LEN = 64
BATCH = 4


@pytest.fixture(scope="module")
def mixture(spm_path):
    return tasks.register(spm_path, LANGS, pivot="en", temperature=5.0, prefix="t_bible")


@pytest.fixture(scope="module")
def batches(mixture):
    it = pipeline.train_batches(mixture, SRC_LEN, TGT_LEN, BATCH, seed=0)
    return [next(it) for _ in range(12)]


def test_mixture_rates_formula():
    sizes = {"a": 1000, "b": 100, "c": 10}
    for t in (0.5, 1.0, 2.0, 5.0):
        rates = tasks.mixture_rates(sizes, t)
        assert math.isclose(sum(rates.values()), 1.0)
        z = sum(n ** (1 / t) for n in sizes.values())
        for k, n in sizes.items():
            assert math.isclose(rates[k], n ** (1 / t) / z)
    assert tasks.mixture_rates(sizes, 1.0) == pytest.approx({"a": 1000 / 1110, "b": 100 / 1110,
                                                             "c": 10 / 1110})
    near_uniform = tasks.mixture_rates(sizes, 1e4)
    assert all(abs(r - 1 / 3) < 1e-3 for r in near_uniform.values())
    with pytest.raises(ValueError, match="temperature"):
        tasks.mixture_rates(sizes, 0.0)


def test_register_names_tasks_and_mixture(mixture, spm_path):
    assert mixture == "t_bible_mix"
    names = {n for n in seqio.TaskRegistry.names() if n.startswith("t_bible_")}
    expected = {"t_bible_en_de", "t_bible_en_ru", "t_bible_de_en", "t_bible_ru_en"}
    assert names == expected and len(names) == 2 * (len(LANGS) - 1)
    mix = seqio.get_mixture_or_task(mixture)
    assert {t.name for t in mix.tasks} == expected
    assert math.isclose(sum(mix.get_rate(t) for t in mix.tasks), 1.0)
    task = seqio.get_mixture_or_task("t_bible_en_de")
    assert set(task.splits) == {"train", "validation", "test"}
    assert task.num_input_examples("test") == len(embedded.parallel_pairs("en", "de", "test")[0])
    report = tasks.SKIP_REPORTS["t_bible_de_en"]["train"]
    assert report.skipped["empty_source"] == 3 and report.kept + 3 == report.total


def test_reregistering_replaces_previous_registration(mixture, spm_path):
    assert tasks.register(spm_path, ("en", "fr"), prefix="t_bible") == mixture
    names = {n for n in seqio.TaskRegistry.names() if n.startswith("t_bible_")}
    assert names == {"t_bible_en_fr", "t_bible_fr_en"}
    assert tasks.register(spm_path, LANGS, prefix="t_bible") == mixture
    assert len([n for n in seqio.TaskRegistry.names() if n.startswith("t_bible_")]) == 4


def test_register_rejects_bad_arguments(spm_path, tmp_path):
    with pytest.raises(ValueError, match="pivot"):
        tasks.register(spm_path, ("de", "fr"), pivot="en", prefix="t_bad")
    with pytest.raises(ValueError, match="'xx'"):
        tasks.register(spm_path, ("en", "xx"), prefix="t_bad")
    with pytest.raises(FileNotFoundError):
        tasks.register(tmp_path / "none.model", LANGS, prefix="t_bad")


def test_task_examples_are_tagged_tokenised_and_end_in_eos(mixture, spm_path):
    sp = vocab.load_processor(spm_path)
    task = seqio.get_mixture_or_task("t_bible_en_ru")
    ex = next(task.get_dataset({"inputs": 512, "targets": 512}, split="test",
                               shuffle=False).as_numpy_iterator())
    src, tgt = embedded.parallel_pairs("en", "ru", "test")[0][0]
    assert ex["inputs_pretokenized"].decode() == embedded.tag_source(src, "ru")
    assert ex["targets_pretokenized"].decode() == tgt
    assert list(ex["inputs"]) == sp.encode(embedded.tag_source(src, "ru")) + [vocab.EOS_ID]
    assert list(ex["targets"]) == sp.encode(tgt) + [vocab.EOS_ID]


def test_batches_have_static_int32_shapes(batches):
    for b in batches:
        assert tuple(b) == pipeline.BATCH_KEYS
        for k, v in b.items():
            assert v.dtype == np.int32, k
            assert v.shape == (BATCH, SRC_LEN if k.startswith("encoder") else TGT_LEN), k


def test_batches_are_packed(batches):
    assert any(b["encoder_segment_ids"].max() > 1 for b in batches)
    assert any(b["decoder_segment_ids"].max() > 1 for b in batches)


def _segments(seg_row):
    for s in range(1, int(seg_row.max()) + 1):
        idx = np.flatnonzero(seg_row == s)
        if idx.size:
            yield idx


def test_every_segment_starts_with_a_tag_and_targets_end_in_eos(batches, spm_path):
    sp = vocab.load_processor(spm_path)
    tag_ids = {vocab.tag_id(sp, lang) for lang in LANGS}
    n = 0
    for b in batches:
        for r in range(BATCH):
            for idx in _segments(b["encoder_segment_ids"][r]):
                assert b["encoder_input_tokens"][r, idx[0]] in tag_ids
                assert b["encoder_positions"][r, idx[0]] == 0
                assert b["encoder_input_tokens"][r, idx[-1]] == vocab.EOS_ID
                n += 1
            for idx in _segments(b["decoder_segment_ids"][r]):
                assert b["decoder_target_tokens"][r, idx[-1]] == vocab.EOS_ID
                assert b["decoder_input_tokens"][r, idx[0]] == 0  # shifted-in start
                assert np.all(b["decoder_loss_weights"][r, idx] == 1)
    assert n > len(batches) * BATCH  # some rows hold several examples


def test_unpacked_batches_have_the_same_keys(mixture):
    b = next(pipeline.train_batches(mixture, 32, 32, BATCH, seed=1, batching="pad"))
    assert tuple(b) == pipeline.BATCH_KEYS
    assert all(v.shape == (BATCH, 32) and v.dtype == np.int32 for v in b.values())
    mask = b["decoder_target_tokens"] != 0
    np.testing.assert_array_equal(b["decoder_segment_ids"], mask.astype(np.int32))
    np.testing.assert_array_equal(b["decoder_positions"][0][mask[0]],
                                  np.arange(mask[0].sum()))


def test_same_seed_same_batches_and_shards_differ(mixture, batches):
    again = pipeline.train_batches(mixture, SRC_LEN, TGT_LEN, BATCH, seed=0)
    for b in batches[:3]:
        np.testing.assert_array_equal(next(again)["encoder_input_tokens"],
                                      b["encoder_input_tokens"])
    s0 = next(pipeline.train_batches(mixture, SRC_LEN, TGT_LEN, BATCH, seed=0,
                                     shard_index=0, num_shards=2))
    s1 = next(pipeline.train_batches(mixture, SRC_LEN, TGT_LEN, BATCH, seed=0,
                                     shard_index=1, num_shards=2))
    assert not np.array_equal(s0["encoder_input_tokens"], s1["encoder_input_tokens"])
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.train_batches(mixture, 8, 8, 2, seed=0, shard_index=2, num_shards=2)
    with pytest.raises(ValueError, match="positive"):
        pipeline.train_batches(mixture, 8, 0, 2, seed=0)
