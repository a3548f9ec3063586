"""Language adapters and LoRA: a new adapter or LoRA pair is the base model exactly;
merged LoRA computes what the low-rank path computes; each token goes through its own
language's adapter only (teacher forcing, greedy and beam search); scanned, rematerialised
and mesh-sharded models agree; missing routing ids are a clear error."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.config import AdapterConfig, DecodeConfig, LoraConfig, MeshConfig, ModelConfig
from jaxmt.modeling.adapters import is_added_param, merge_lora
from jaxmt.modeling.decoding import EOS_ID
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.network import stack_layers
from jaxmt.sharding.partitioning import Partitioner

BASE = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                   num_encoder_layers=2, num_decoder_layers=2, precision="fp32")
ADAPTER = AdapterConfig(size=8, langs=("de", "fr", "ru"))
LORA = LoraConfig(rank=4, alpha=8.0)
BOTH = dataclasses.replace(BASE, adapter=ADAPTER, lora=LORA)
# Per source row: (encoder id, decoder id). Language 1 routes rows 0 and 1 only.
ROUTES = np.array([[0, 1], [1, 2], [2, 0], [-1, -1], [0, 2]], np.int32)
BEAM = DecodeConfig(beam_size=3, n_best=2, no_repeat_ngram_size=0, max_len_a=0.0, max_len_b=8,
                    suppressed_ids=())


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


@pytest.fixture(scope="module")
def both_params():
    """Parameters of the model with adapters and LoRA, initialised once (op by op, the
    first init of a module costs seconds); the other models take subsets of them."""
    model = EncoderDecoderModel(BOTH)
    return nn.unbox(model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))


def _for(cfg: ModelConfig, params):
    """``cfg``'s model and its parameters out of ``params`` (BOTH's): the adapters and
    LoRA pairs that ``cfg`` lacks left out."""
    def keep(k):
        return not ((k == "adapter" and not cfg.adapter.size)
                    or (k.endswith(("_lora_a", "_lora_b")) and not cfg.lora.rank))

    def strip(node):
        return {k: strip(v) for k, v in node.items() if keep(k)} if isinstance(node, dict) else node
    return EncoderDecoderModel(cfg), strip(params)


def _randomise(params, pick, seed: int, std: float = 0.5):
    """``params`` with the leaves whose path ``pick`` accepts drawn from N(0, std)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, std, x.shape), x.dtype) if pick(_path(p)) else x,
        params)


def _sources(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, 64, (rows, 9)).astype(np.int32)
    enc[:, -1] = EOS_ID
    enc[1, 5:], enc[1, 4] = 0, EOS_ID  # a shorter, padded source
    return enc


def _batch(routes: np.ndarray, seed: int = 0) -> dict:
    """A teacher-forced batch, one row per route, per-token routing ids (-1 on padding)."""
    rows = len(routes)
    b = EncoderDecoderModel(BASE).random_batch(rows, 9, 7, seed)
    b["encoder_input_tokens"][1, 6:] = 0  # padding in one row
    b["encoder_segment_ids"] = (b["encoder_input_tokens"] > 0).astype(np.int32)
    b["encoder_lang_ids"] = np.where(b["encoder_segment_ids"] > 0, routes[:, :1], -1)
    b["decoder_lang_ids"] = np.broadcast_to(routes[:, 1:], (rows, 7)).astype(np.int32)
    return b


def _decode_batch(routes: np.ndarray) -> dict:
    return dict(encoder_input_tokens=_sources(len(routes)), encoder_lang_ids=routes[:, 0],
                decoder_lang_ids=routes[:, 1])


def test_is_added_param():
    assert is_added_param("encoder/layers_0/adapter/up")
    assert is_added_param("decoder/layers/adapter/scale")
    assert is_added_param("decoder/layers_1/self_attention/query_lora_a")
    assert is_added_param("encoder/layers_0/mlp/wi_0_lora_b")
    assert not is_added_param("encoder/layers_0/mlp/wo")
    assert not is_added_param("decoder/layers_0/self_attention/query_bias")


def test_param_shapes_and_axes():
    model = EncoderDecoderModel(BOTH)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))
    layer = boxed["decoder"]["layers_1"]
    got = {k: (v.value.shape, v.names) for k, v in layer["adapter"].items()}
    assert got == {"scale": ((3, 32), ("adapter_langs", "embed")),
                   "bias": ((3, 32), ("adapter_langs", "embed")),
                   "down": ((3, 32, 8), ("adapter_langs", "embed", "adapter_mlp")),
                   "down_bias": ((3, 8), ("adapter_langs", "adapter_mlp")),
                   "up": ((3, 8, 32), ("adapter_langs", "adapter_mlp", "embed")),
                   "up_bias": ((3, 32), ("adapter_langs", "embed"))}
    attn, mlp = layer["cross_attention"], layer["mlp"]
    assert (attn["key_lora_a"].value.shape, attn["key_lora_a"].names) == (
        (32, 4), ("embed", "lora_rank"))
    assert (attn["key_lora_b"].value.shape, attn["key_lora_b"].names) == (
        (4, 4, 8), ("lora_rank", "heads", "kv"))
    assert (attn["out_lora_a"].value.shape, attn["out_lora_a"].names) == (
        (4, 8, 4), ("heads", "kv", "lora_rank"))
    assert attn["out_lora_b"].value.shape == (4, 32)
    assert mlp["wi_1_lora_b"].names == ("lora_rank", "mlp")
    assert mlp["wo_lora_a"].names == ("mlp", "lora_rank")
    # Targets pick the projections; the rest stay plain.
    only = EncoderDecoderModel(dataclasses.replace(BASE, lora=LoraConfig(rank=2,
                                                                         targets=("value",))))
    names = set(jax.eval_shape(lambda: only.init(jax.random.PRNGKey(0), only.dummy_batch(
        1, 8, 8)))["encoder"]["layers_0"]["attention"])
    assert names == {"query", "key", "value", "out", "value_lora_a", "value_lora_b"}


def test_new_adapters_and_lora_start_at_zero(both_params):
    """New adapters are the identity (up and its bias zero); every LoRA B is zero."""
    leaves = {_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(both_params)}
    zero = [p for p in leaves if p.endswith(("/adapter/up", "/adapter/up_bias", "_lora_b"))]
    # 4 layers' up and up_bias; a B per projection: q, k, v, out of each attention and
    # the MLP's wi_0, wi_1, wo, in 2 encoder and 2 decoder layers.
    assert len(zero) == 4 * 2 + 2 * (4 + 3) + 2 * (4 + 4 + 3)
    assert not any(np.any(leaves[p]) for p in zero)
    assert all(np.any(leaves[p]) for p in leaves if p.endswith(("_lora_a", "/adapter/down")))


def test_new_lora_and_unrouted_adapters_are_the_base_exactly(both_params):
    """LoRA at init (B = 0) and adapters on tokens routed -1 (even randomised ones) give
    the base model's logits bit for bit."""
    base, base_params = _for(BASE, both_params)
    batch = _batch(ROUTES)
    want = np.asarray(base.logits(base_params, batch))
    lora, lora_params = _for(dataclasses.replace(BASE, lora=LORA), both_params)
    np.testing.assert_array_equal(np.asarray(lora.logits(lora_params, batch)), want)
    model = EncoderDecoderModel(BOTH)
    params = _randomise(both_params, lambda p: "/adapter/" in p, seed=1)
    off = dict(batch, encoder_lang_ids=np.full_like(batch["encoder_lang_ids"], -1),
               decoder_lang_ids=np.full_like(batch["decoder_lang_ids"], -1))
    np.testing.assert_array_equal(np.asarray(model.logits(params, off)), want)
    # And size 0: routing ids are ignored.
    np.testing.assert_array_equal(np.asarray(base.logits(base_params, off)), want)


def _trained_lora(both_params):
    """The LoRA model with every B drawn at random (as training would move it)."""
    cfg = dataclasses.replace(BASE, lora=LORA)
    model, params = _for(cfg, both_params)
    return model, _randomise(params, lambda p: p.endswith("_lora_b"), seed=2, std=0.2)


def test_merged_lora_equals_the_low_rank_path(both_params):
    model, params = _trained_lora(both_params)
    cfg, batch = model.cfg, _batch(ROUTES)
    merged, merged_cfg = merge_lora(params, cfg)
    assert merged_cfg == BASE
    assert not any(is_added_param(_path(p)) for p, _ in
                   jax.tree_util.tree_leaves_with_path(merged))
    plain, base_params = _for(merged_cfg, params)
    assert jax.tree.structure(merged) == jax.tree.structure(base_params)
    # Jitted (compared within tolerances): op by op, each primitive compiles on its own.
    want = np.asarray(jax.jit(model.logits)(params, batch))
    plain_logits = jax.jit(plain.logits)
    assert not np.allclose(want, np.asarray(plain_logits(base_params, batch)),
                           atol=1e-2)  # B != 0 changed the model
    np.testing.assert_allclose(np.asarray(plain_logits(merged, batch)), want, atol=1e-5,
                               rtol=1e-5)
    # Host numpy and scanned (stacked) parameters merge to the same weights.
    host, _ = merge_lora(jax.device_get(params), cfg)
    scanned, _ = merge_lora(stack_layers(params), dataclasses.replace(cfg, scan_layers=True))
    for got in (host, scanned):
        ref = merged if got is host else stack_layers(merged)
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_merged_lora_decodes_as_the_low_rank_path(both_params):
    """LoRA in decode steps (the cached keys and values, cross-attention's projections of
    the source) gives the merged model's greedy and beam outputs."""
    model, params = _trained_lora(both_params)
    merged, merged_cfg = merge_lora(params, model.cfg)
    plain = EncoderDecoderModel(merged_cfg)
    src = {"encoder_input_tokens": _sources(3)}
    np.testing.assert_array_equal(np.asarray(plain.predict_batch(merged, src, max_decode_len=8)),
                                  np.asarray(model.predict_batch(params, src, max_decode_len=8)))
    (ids, scores), (want_ids, want_scores) = (
        m.predict_batch_with_aux(p, src, BEAM, 8) for m, p in ((plain, merged), (model, params)))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), atol=1e-5, rtol=1e-5)


def _one_language_changed(params, k: int, seed: int):
    """``params`` with language ``k``'s slice of every adapter parameter redrawn."""
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        if "/adapter/" not in _path(path):
            return x
        lead = x.ndim - {"down": 3, "up": 3}.get(_path(path).rsplit("/", 1)[-1], 2)
        idx = (slice(None),) * lead + (k,)  # scanned parameters lead with the layer axis
        return x.at[idx].set(jnp.asarray(rng.normal(0, 0.5, x[idx].shape), x.dtype))
    return jax.tree_util.tree_map_with_path(redraw, params)


@pytest.fixture(scope="module")
def routed(both_params):
    """The adapter model with every adapter randomised, and the same with language 1's
    adapters redrawn."""
    model, params = _for(dataclasses.replace(BASE, adapter=ADAPTER), both_params)
    params = _randomise(params, lambda p: "/adapter/" in p, seed=3)
    return model, params, _one_language_changed(params, 1, seed=4)


def test_each_token_goes_through_its_own_adapter(routed):
    model, params, changed = routed
    batch = _batch(ROUTES)
    before, after = (np.asarray(model.logits(p, batch)) for p in (params, changed))
    hit = (ROUTES == 1).any(1)  # rows 0 and 1
    np.testing.assert_array_equal(after[~hit], before[~hit])
    for r in np.flatnonzero(hit):
        assert not np.allclose(after[r], before[r], atol=1e-3), r
    # Per-row ids [b] are per-token ids broadcast over the row (padding aside).
    rows = dict(batch, encoder_lang_ids=ROUTES[:, 0], decoder_lang_ids=ROUTES[:, 1])
    np.testing.assert_allclose(np.asarray(model.logits(params, rows)), before, atol=1e-5)


@pytest.mark.slow
def test_decoding_routes_each_row(routed):
    """Greedy, sampling and beam search in one mixed batch: rows not routed to the
    redrawn language decode exactly as before; cached greedy steps equal the
    teacher-forced pass with the same routing."""
    model, params, changed = routed
    batch, hit = _decode_batch(ROUTES), (ROUTES == 1).any(1)
    greedy = [np.asarray(model.predict_batch(p, batch, max_decode_len=8))
              for p in (params, changed)]
    np.testing.assert_array_equal(greedy[1][~hit], greedy[0][~hit])
    sample = DecodeConfig(strategy="sample", num_decodes=2, n_best=2, seed=1,
                          no_repeat_ngram_size=0, suppressed_ids=())
    for opts in (BEAM, sample):
        (ids0, s0), (ids1, s1) = (model.predict_batch_with_aux(p, batch, opts, 8)
                                  for p in (params, changed))
        np.testing.assert_array_equal(np.asarray(ids1)[~hit], np.asarray(ids0)[~hit])
        np.testing.assert_array_equal(np.asarray(s1)[~hit], np.asarray(s0)[~hit])
        assert not np.allclose(np.asarray(s1)[hit], np.asarray(s0)[hit], atol=1e-4)
    # Each greedy token is the teacher-forced argmax over its own prefix, routed alike.
    out = greedy[0]
    dec_in = np.concatenate([np.zeros((len(out), 1), np.int32), out[:, :-1]], 1)
    enc = batch["encoder_input_tokens"]
    tf = dict(encoder_input_tokens=enc, encoder_segment_ids=(enc > 0).astype(np.int32),
              decoder_input_tokens=dec_in, decoder_segment_ids=np.ones_like(dec_in),
              encoder_lang_ids=ROUTES[:, 0], decoder_lang_ids=ROUTES[:, 1])
    want = np.asarray(model.logits(params, tf)).argmax(-1)
    for r in range(len(out)):
        end = list(out[r]).index(EOS_ID) + 1 if EOS_ID in out[r] else out.shape[1]
        np.testing.assert_array_equal(out[r, :end], want[r, :end], err_msg=str(r))


@pytest.mark.slow
def test_scanned_and_rematerialised_stacks_agree(both_params):
    """Adapters and LoRA (all randomised) in a scanned stack with remat "full": the
    logits, the gradients and the greedy outputs of the unrolled model."""
    model = EncoderDecoderModel(BOTH)
    # Small enough that float32 rounding stays small (std 0.2 made the two orders of
    # summation differ by 5e-5 of the largest gradient), large enough to matter.
    params = _randomise(both_params, is_added_param, seed=5, std=0.05)
    batch = _batch(ROUTES)
    # Jitted: op by op, the gradients of two stacks on 8 devices take most of a minute.
    loss = lambda m, p: m.loss(p, batch, dropout_rng=None)[0]  # noqa: E731
    logits = lambda m: jax.jit(lambda p: m.logits(p, batch))  # noqa: E731
    want = np.asarray(logits(model)(params))
    assert not np.allclose(want, np.asarray(logits(model)(both_params)), atol=1e-2)
    want_grads = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    src = _decode_batch(ROUTES)
    want_ids = np.asarray(model.predict_batch(params, src, max_decode_len=8))
    other = EncoderDecoderModel(dataclasses.replace(BOTH, scan_layers=True, encoder_remat="full",
                                                    decoder_remat="full"))
    stacked = stack_layers(params)
    np.testing.assert_allclose(np.asarray(logits(other)(stacked)), want, atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: loss(other, p)))(stacked)
    assert jax.tree.structure(grads) == jax.tree.structure(stack_layers(want_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(stack_layers(want_grads))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(
        np.asarray(other.predict_batch(stacked, src, max_decode_len=8)), want_ids)


@pytest.mark.slow
def test_mesh_shards_by_the_rules_and_matches_one_device(both_params):
    model = EncoderDecoderModel(BOTH)
    params = _randomise(both_params, is_added_param, seed=6, std=0.05)
    routes = np.concatenate([ROUTES[:4]] * 2)  # 8 rows: the batch splits 4 ways
    batch = _batch(routes)
    want = np.asarray(jax.jit(model.logits)(params, batch))  # one device, one program
    p = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2))
    boxed = p.eval_shape(lambda: model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))
    shardings = p.logical_shardings(boxed, params=True)
    sharded = jax.device_put(params, shardings)
    norm = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))  # noqa: E731
    layer = sharded["decoder"]["layers_0"]
    expected = {("adapter", "down"): (None, "fsdp", None), ("adapter", "up"): (None, None, "fsdp"),
                ("adapter", "scale"): (None, "fsdp"),
                ("self_attention", "query_lora_a"): ("fsdp", None),
                ("self_attention", "query_lora_b"): (None, "tensor", None),
                ("cross_attention", "out_lora_a"): ("tensor", None, None),
                ("cross_attention", "out_lora_b"): (None, "fsdp"),
                ("mlp", "wi_0_lora_b"): (None, "tensor"), ("mlp", "wo_lora_a"): ("tensor", None)}
    for (mod, name), spec in expected.items():
        x = layer[mod][name]
        assert norm(x.sharding.spec, x.ndim) == spec, (mod, name, x.sharding.spec)
    logits = p.jit(model.logits, in_shardings=(shardings, p.batch_sharding))(
        sharded, p.shard_batch(batch, len(routes)))
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=1e-5)
    src = _decode_batch(routes)
    src["encoder_input_tokens"] = _sources(len(routes))
    want_ids, want_scores = model.predict_batch_with_aux(params, src, BEAM, 8)
    ids, scores = p.jit(lambda prm, b: model.predict_batch_with_aux(prm, b, BEAM, 8))(
        sharded, src)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), atol=1e-5)


def test_missing_or_misshapen_routing_ids_are_clear_errors(both_params):
    model, params = _for(dataclasses.replace(BASE, adapter=ADAPTER), both_params)
    batch = _batch(ROUTES)
    for key in ("encoder_lang_ids", "decoder_lang_ids"):
        with pytest.raises(ValueError, match=key):
            model.logits(params, {k: v for k, v in batch.items() if k != key})
        with pytest.raises(ValueError, match=key):
            model.predict_batch(params, {k: v for k, v in _decode_batch(ROUTES).items()
                                         if k != key}, max_decode_len=4)
    with pytest.raises(ValueError, match=r"encoder_lang_ids.*\[5\] or \[5, 9\]"):
        model.logits(params, dict(batch, encoder_lang_ids=np.zeros((5, 3), np.int32)))
