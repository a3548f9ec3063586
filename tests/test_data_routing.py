"""Language-adapter routing ids in the training batches (packing.LANG_KEYS): each token
carries its example's encoder / decoder id, padding -1, for every batching and for both
example sources, and the other features are exactly those of the same call without."""

import numpy as np
import pytest

from jaxmt.data import bucketing, packing
from jaxmt.data.packing import BATCH_KEYS, LANG_KEYS

seqio = pytest.importorskip("seqio")
from jaxmt.data import cache, pipeline, tasks, vocab  # noqa: E402

LANGS = ("en", "de", "ru")
LEN = 32
# Direction-keyed ids (AdapterConfig(route="direction") style); ru->en is unmapped: the
# route raises KeyError, and its examples must get -1, not vanish or fail.
IDS = {("en", "de"): (0, 1), ("en", "ru"): (2, 3), ("de", "en"): (4, 5)}


def route(src, tgt):
    return IDS[(src, tgt)]


def _expected(src, tgt):
    return IDS.get((src, tgt), (-1, -1))


def _examples(n, seed=0, max_len=20):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = rng.integers(2, 500, rng.integers(2, max_len + 1)).astype(np.int32)
        tgt = rng.integers(2, 500, rng.integers(1, max_len + 1)).astype(np.int32)
        src[0], src[-1], tgt[-1] = 1000 + i, 1, 1  # each source unique: its ids findable
        out.append((src, tgt, tuple(int(x) for x in rng.integers(-1, 4, 2))))
    return out


def _check_ids_follow_segments(batch, ids_of):
    """Every token's ids are ``ids_of(encoder segment tokens)`` of its segment; padding -1."""
    for k in LANG_KEYS:
        assert batch[k].dtype == np.int32
        assert batch[k].shape == batch[k.replace("lang_ids", "segment_ids")].shape
    n = 0
    for r in range(batch["encoder_input_tokens"].shape[0]):
        eseg, dseg = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
        assert np.all(batch["encoder_lang_ids"][r][eseg == 0] == -1)
        assert np.all(batch["decoder_lang_ids"][r][dseg == 0] == -1)
        for s in set(eseg.tolist()) - {0}:
            enc, dec = ids_of(batch["encoder_input_tokens"][r][eseg == s])
            assert np.all(batch["encoder_lang_ids"][r][eseg == s] == enc)
            assert np.all(batch["decoder_lang_ids"][r][dseg == s] == dec)
            n += 1
    return n


# ------------------------------------------------------------------ numpy units

def test_row_features_fill_lang_ids_per_segment():
    src_len, tgt_len = 10, 8
    rows = [([np.array([5, 6, 1]), np.array([7, 1])], [np.array([8, 1]), np.array([9, 9, 1])],
             [(0, 1), (2, -1)]),
            ([np.array([3, 3, 3, 1])], [np.array([4, 1])], [(3, 3)])]
    got = packing.row_features(rows, src_len, tgt_len)
    assert tuple(got) == BATCH_KEYS + LANG_KEYS
    np.testing.assert_array_equal(got["encoder_lang_ids"],
                                  [[0, 0, 0, 2, 2, -1, -1, -1, -1, -1],
                                   [3, 3, 3, 3, -1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(got["decoder_lang_ids"],
                                  [[1, 1, -1, -1, -1, -1, -1, -1],
                                   [3, 3, -1, -1, -1, -1, -1, -1]])
    plain = packing.row_features([r[:2] for r in rows], src_len, tgt_len)
    assert tuple(plain) == BATCH_KEYS  # no ids in, no ids out
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(got[k], plain[k])
    # A row without ids among rows with them: -1 throughout.
    mixed = packing.row_features([rows[0], rows[1][:2]], src_len, tgt_len)
    assert np.all(mixed["encoder_lang_ids"][1] == -1) and np.all(mixed["decoder_lang_ids"][1] == -1)
    with pytest.raises(ValueError, match="routing ids"):
        packing.row_features([(rows[0][0], rows[0][1], [(0, 1)])], src_len, tgt_len)


def test_packer_and_buckets_keep_ids_without_changing_the_batches():
    exs = _examples(800)
    ids_of = {tuple(s[:LEN].tolist()): ids for s, _, ids in exs}.__getitem__
    lookup = lambda toks: ids_of(tuple(toks.tolist()))  # noqa: E731
    with_ids = list(packing.packed_batches(exs, LEN, LEN, 8, max_open_rows=16))
    plain = list(packing.packed_batches([e[:2] for e in exs], LEN, LEN, 8, max_open_rows=16))
    assert len(with_ids) == len(plain) > 3
    for a, b in zip(with_ids, plain):
        assert tuple(b) == BATCH_KEYS and tuple(a) == BATCH_KEYS + LANG_KEYS
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
        assert _check_ids_follow_segments(a, lookup) > 8
    # Pairs still give pairs: the rows of existing callers are unchanged.
    assert all(len(row) == 2 for row in packing.pack_rows([e[:2] for e in exs[:50]], LEN, LEN))

    shapes, weights = [(8, 16), (4, LEN)], [0.5, 0.5]
    a = bucketing.bucketed_batches(exs, shapes, weights, seed=3, src_len=LEN, tgt_len=LEN)
    b = bucketing.bucketed_batches([e[:2] for e in exs], shapes, weights, seed=3,
                                   src_len=LEN, tgt_len=LEN)
    n = 0
    for x, y in zip(a, b):
        assert tuple(y) == BATCH_KEYS and set(x) == set(BATCH_KEYS + LANG_KEYS)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
        n += _check_ids_follow_segments(x, lookup)
    assert n > 100


def test_router_maps_unknown_and_unmappable_directions_to_minus_one():
    r = pipeline._Router(route)
    assert r(b"en", b"de") == (0, 1) and r("de", "en") == (4, 5)
    assert r("ru", "en") == (-1, -1)  # KeyError: no adapter, kept
    assert r(None, None) == (-1, -1)  # a Task of unknown direction
    with pytest.raises(ValueError, match=">= -1"):
        pipeline._Router(lambda s, t: (-2, 0))("en", "de")


# ------------------------------------------------------------------ the pipeline

@pytest.fixture(scope="module")
def sp(spm_path):
    return vocab.load_processor(spm_path)


@pytest.fixture(scope="module")
def mixture(spm_path):
    return tasks.register(spm_path, LANGS, pivot="en", prefix="t_route")


def _direction(sp, toks):
    """(src, tgt) of an encoder segment: the target from its tag, the source language
    from the pivot (or, into English, Cyrillic means Russian)."""
    by_tag = {vocab.tag_id(sp, lang): lang for lang in LANGS}
    tgt = by_tag[int(toks[0])]
    if tgt != "en":
        return "en", tgt
    text = sp.decode([int(t) for t in toks if t != vocab.EOS_ID])
    return ("ru" if any("\u0400" <= c <= "\u04ff" for c in text) else "de"), tgt


def _assert_same_batches_plus_ids(with_route, without, sp, n):
    seen = set()
    for _ in range(n):
        a, b = next(with_route), next(without)
        assert tuple(b) == BATCH_KEYS and tuple(a) == BATCH_KEYS + LANG_KEYS
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)

        def ids_of(toks):
            d = _direction(sp, toks)
            seen.add(d)
            return _expected(*d)
        _check_ids_follow_segments(a, ids_of)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["pack", "pad", "bucket"])
def test_on_the_fly_batches_carry_each_segments_direction(mixture, sp, batching):
    kw = dict(seed=3, batching=batching)
    if batching == "bucket":
        kw["buckets"] = [(8, 16), (4, LEN)]
    n = 6 if batching == "pack" else 12
    seen = _assert_same_batches_plus_ids(
        pipeline.train_batches(mixture, LEN, LEN, 4, route=route, **kw),
        pipeline.train_batches(mixture, LEN, LEN, 4, **kw), sp, n)
    # Every direction showed up, the unmapped ru->en too (with -1 ids, not dropped).
    assert seen == {("en", "de"), ("en", "ru"), ("de", "en"), ("ru", "en")}


@pytest.mark.slow
def test_a_task_alone_and_a_resumed_stream_carry_ids(mixture, sp):
    it = pipeline.train_batches("t_route_en_ru", LEN, LEN, 4, seed=0, route=route,
                                batching="pad")
    b = next(it)
    assert np.all(b["encoder_lang_ids"][b["encoder_segment_ids"] > 0] == 2)
    assert np.all(b["decoder_lang_ids"][b["decoder_segment_ids"] > 0] == 3)
    full = pipeline.train_batches(mixture, LEN, LEN, 4, seed=1, route=route)
    want = [next(full) for _ in range(4)]
    resumed = pipeline.train_batches(mixture, LEN, LEN, 4, seed=1, route=route, start_batch=2)
    for a, b in zip(want[2:], (next(resumed) for _ in range(2))):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module")
def small_cache(spm_path, tmp_path_factory):
    """400 en-de pairs of the embedded corpus as a user corpus (both directions), cached."""
    from jaxmt.data import embedded

    path = tmp_path_factory.mktemp("corpus") / "en-de.tsv"
    pairs = embedded.parallel_pairs("en", "de", "train")[0][:400]
    path.write_text("".join(f"{en}\t{de}\n" for en, de in pairs), encoding="utf-8")
    mixture = tasks.register_corpus([{"path": str(path), "src_lang": "en", "tgt_lang": "de"}],
                                    spm_path, prefix="t_route_corpus")
    root = str(tmp_path_factory.mktemp("route_cache"))
    cache.build(root, mixture, spm_path, num_shards=2, progress=False)
    return mixture, root


@pytest.mark.slow
def test_cached_and_corpus_batches_carry_ids(small_cache, sp):
    mixture, root = small_cache
    for batching in ("pack", "pad"):
        for cache_dir in (root, None):  # the cache, and the corpus tokenised on the fly
            seen = _assert_same_batches_plus_ids(
                pipeline.train_batches(mixture, LEN, LEN, 4, seed=2, batching=batching,
                                       cache_dir=cache_dir, route=route),
                pipeline.train_batches(mixture, LEN, LEN, 4, seed=2, batching=batching,
                                       cache_dir=cache_dir), sp, 4)
            assert seen == {("en", "de"), ("de", "en")}, (batching, cache_dir)
    # The cache's examples are the same with and without labels, in the same order.
    a = cache.cached_examples(mixture, root, seed=0, src_len=LEN, tgt_len=LEN,
                              task_label=lambda t: t)
    b = cache.cached_examples(mixture, root, seed=0, src_len=LEN, tgt_len=LEN)
    for _ in range(50):
        (s1, t1, task), (s2, t2) = next(a), next(b)
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(t1, t2)
        assert task in tasks.MIXTURES[mixture].directions
