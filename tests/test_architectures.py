"""Architecture families, the scanned layer stack and rematerialisation.

Each family keeps logical axes on every parameter and decodes identically with and
without the KV cache; the scanned stack computes exactly what the unrolled stack
computes on the same (stacked) parameters; every remat policy leaves the loss and
the gradients unchanged.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.config import ModelConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.network import stack_layers, unstack_layers
from jaxmt.sharding.partitioning import topology_devices

from greedy_reference import full_recompute_greedy

BASE = dict(vocab_size=96, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
            num_encoder_layers=2, num_decoder_layers=2, precision="fp32")
T5_1_1 = ModelConfig(**BASE)
T5 = ModelConfig(**BASE, mlp_activations=("relu",), tie_embeddings=True, rescale_logits=True)
MARIAN = ModelConfig(**BASE, mlp_activations=("silu",), position_embedding="sinusoidal",
                     norm_type="layer", norm_position="post", norm_epsilon=1e-5, use_bias=True,
                     scale_embeddings=True, tie_embeddings=True, final_logits_bias=True)
MARIAN_PRE = dataclasses.replace(MARIAN, norm_position="pre")
FAMILIES = {"t5_1_1": T5_1_1, "t5": T5, "marian": MARIAN, "marian_prenorm": MARIAN_PRE}
AXES = {"vocab", "embed", "mlp", "heads", "kv", "layers", "relpos_buckets"}


def _batch(seed=0, b=3, s=11, t=9):
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, 96, (b, s)).astype(np.int32)
    enc[1, 7:] = 0  # padded rows
    dec_in = np.concatenate([np.zeros((b, 1), np.int32),
                             rng.integers(3, 96, (b, t - 1)).astype(np.int32)], 1)
    tgt = np.concatenate([dec_in[:, 1:], np.ones((b, 1), np.int32)], 1)
    tgt[2, 5:] = 0
    dec_in[2, 6:] = 0
    return dict(encoder_input_tokens=enc, encoder_segment_ids=(enc > 0).astype(np.int32),
                decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
                decoder_segment_ids=(tgt > 0).astype(np.int32),
                decoder_loss_weights=(tgt > 0).astype(np.float32))


@functools.cache
def _params(cfg, seed=0):
    """Initialised parameters, once per family and seed (read-only: shared by tests).

    Remat policies leave the parameters alone, and a scanned stack gets the unrolled
    stack's parameters stacked (test_scanned_stack_equals_unrolled checks that layout
    against the scanned init's). Initialised eagerly and unrolled: a jitted or scanned
    init compiles for seconds, per config.
    """
    base = dataclasses.replace(cfg, scan_layers=False, encoder_remat="none",
                               decoder_remat="none")
    if cfg != base:
        params = _params(base, seed)
        return stack_layers(params) if cfg.scan_layers else params
    model = EncoderDecoderModel(cfg)
    return nn.unbox(model.init(jax.random.PRNGKey(seed), model.dummy_batch(1, 8, 8)))


@functools.cache
def _loss_and_grads(cfg):
    """Jitted loss and gradients of _batch() at _params(cfg), once per config: the
    no-remat baselines serve both the scan test and the remat test."""
    model = EncoderDecoderModel(cfg)
    batch = _batch()
    return jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch, dropout_rng=None)[0]))(
        _params(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("family,scan", [(f, False) for f in FAMILIES]
                         + [("t5_1_1", True), ("marian", True)])
def test_family_axes_and_cached_decoding(family, scan):
    cfg = dataclasses.replace(FAMILIES[family], scan_layers=scan)
    model = EncoderDecoderModel(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim and set(x.names) <= AXES for x in leaves)
    assert any("layers" in x.names for x in leaves) == scan
    names = {"/".join(str(k.key) for k in p) for p, _ in
             jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))}
    assert ("decoder/logits_dense" in names) == (not cfg.tie_embeddings)
    assert ("decoder/final_logits_bias" in names) == cfg.final_logits_bias
    assert any("relpos_bias" in n for n in names) == (cfg.position_embedding == "relative")
    assert ("encoder/final_norm/scale" in names) == (cfg.norm_position == "pre")

    params = _params(cfg, seed=1)
    enc = _batch()["encoder_input_tokens"]
    steps = 5
    cached = np.asarray(model.predict_batch(params, {"encoder_input_tokens": enc}, max_decode_len=steps))
    out = full_recompute_greedy(model, params, np.asarray(enc), steps)
    finished = np.cumsum(out == 1, axis=1) - (out == 1) > 0  # after the first EOS
    np.testing.assert_array_equal(cached[~finished], out[~finished])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5_1_1", "marian"])
def test_scanned_stack_equals_unrolled(family):
    unrolled = FAMILIES[family]
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    m_s = EncoderDecoderModel(scanned)
    p_u = _params(unrolled)
    # The scanned init's layout (shapes only: nothing to compute) ...
    p_s_init = jax.eval_shape(
        lambda: nn.unbox(m_s.init(jax.random.PRNGKey(0), m_s.dummy_batch(1, 8, 8))))
    p_s = stack_layers(p_u)
    jax.tree.map(np.testing.assert_array_equal, _params(scanned), p_s)  # used below
    assert jax.tree.structure(p_s) == jax.tree.structure(p_s_init)
    assert all(a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(p_s), jax.tree.leaves(p_s_init)))
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(p_s), p_u)

    (l_u, g_u), (l_s, g_s) = _loss_and_grads(unrolled), _loss_and_grads(scanned)
    np.testing.assert_allclose(l_s, l_u, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 unstack_layers(g_s), g_u)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_leave_loss_and_grads_unchanged(scan):
    cfg = dataclasses.replace(T5_1_1, scan_layers=scan)
    assert (cfg.encoder_remat, cfg.decoder_remat) == ("none", "none")
    loss0, grads0 = _loss_and_grads(cfg)  # shared with test_scanned_stack_equals_unrolled
    for policy in ("full", "dots_saveable", "save_attention_out", "offload"):
        loss, grads = _loss_and_grads(dataclasses.replace(cfg, encoder_remat=policy,
                                                          decoder_remat=policy))
        np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=policy)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                                                             err_msg=policy), grads, grads0)


def _grad_temp_bytes(cfg, batch, sharding=None) -> int:
    model = EncoderDecoderModel(cfg)
    put = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                sharding=sharding), t)
    params = put(jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                            model.dummy_batch(1, 8, 8)))))
    f = jax.jit(jax.grad(lambda p, b: model.loss(p, b, dropout_rng=None)[0]))
    return f.lower(params, put(jax.eval_shape(lambda: batch))).compile(
        ).memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_can_differ_per_stack():
    """Encoder rematerialised, decoder not: the compiled gradient keeps fewer activations
    than without remat, and more than with both stacks rematerialised. (Scanned: XLA's
    CPU backend drops the barriers that keep an unrolled stack's remat apart.)"""
    batch = {k: jnp.asarray(v) for k, v in _batch(b=4, s=64, t=64).items()}
    cfg = dataclasses.replace(T5_1_1, scan_layers=True, num_encoder_layers=4,
                              num_decoder_layers=4)
    temp = lambda enc, dec: _grad_temp_bytes(
        dataclasses.replace(cfg, encoder_remat=enc, decoder_remat=dec), batch)
    none, enc_only, both = temp("none", "none"), temp("full", "none"), temp("full", "full")
    assert both < enc_only < none


@pytest.mark.slow
def test_remat_cuts_memory_of_unrolled_stack_on_tpu():
    """Compiled ahead of time for a TPU chip (libtpu, the `tpu_aot` extra), full remat of
    an unrolled stack keeps several times fewer bytes than no remat."""
    pytest.importorskip("libtpu", reason="needs the tpu_aot extra (pip install -e '.[tpu_aot]')")
    sharding = jax.sharding.SingleDeviceSharding(topology_devices("v5p:2x2x1")[0])
    batch = {k: jnp.asarray(v) for k, v in _batch(b=8, s=64, t=64).items()}
    cfg = dataclasses.replace(T5_1_1, num_encoder_layers=4, num_decoder_layers=4, emb_dim=64,
                              mlp_dim=256)
    temp = lambda policy: _grad_temp_bytes(
        dataclasses.replace(cfg, encoder_remat=policy, decoder_remat=policy), batch, sharding)
    none, full = temp("none"), temp("full")
    assert full * 2 < none, (full, none)


def test_unknown_family_switch_names_the_field():
    with pytest.raises(ValueError, match="ModelConfig.norm_position"):
        ModelConfig(norm_position="sandwich")
    with pytest.raises(ValueError, match="ModelConfig.encoder_remat"):
        ModelConfig(encoder_remat="most")
