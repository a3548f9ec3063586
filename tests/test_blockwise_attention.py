"""Blockwise attention with in-loop T5 relative bias vs the materialising reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.modeling.attention import Masking, MultiHeadAttention, dense_bias
from jaxmt.kernels.blockwise_attention import blockwise_attention
from jaxmt.kernels.common import BlockSizes, RelPos, reference_attention
from jaxmt.modeling.layers import RelativePositionBias

from attention_cases import make_inputs, segments as _segments

B, H, D, NB = 2, 2, 8, 32
TOL = dict(rtol=1e-5, atol=1e-5)


_inputs = functools.partial(make_inputs, B, H, D, NB)  # (lq, lk, seed=0)


def _check(lq, lk, blocks, relpos=None, **kw):
    q, k, v, table, ct = _inputs(lq, lk)
    table = table if relpos is not None else None

    def loss(fn, q, k, v, t, **extra):
        return jnp.sum(fn(q, k, v, bias_table=t, relpos=relpos, **kw, **extra) * ct)

    # Jitted: op by op (the gradients above all), every primitive compiles on its own.
    ref = jax.jit(lambda q, k, v, t: reference_attention(
        q, k, v, bias_table=t, relpos=relpos, **kw))(q, k, v, table)
    out = jax.jit(lambda q, k, v, t: blockwise_attention(
        q, k, v, bias_table=t, relpos=relpos, block_sizes=blocks, **kw))(q, k, v, table)
    np.testing.assert_allclose(out, ref, **TOL)
    argnums = (0, 1, 2, 3) if relpos is not None else (0, 1, 2)
    g_ref = jax.jit(jax.grad(lambda *a: loss(reference_attention, *a), argnums))(q, k, v, table)
    g_blk = jax.jit(jax.grad(lambda *a: loss(blockwise_attention, *a, block_sizes=blocks),
                             argnums))(q, k, v, table)
    for name, a, b in zip("qkvt", g_ref, g_blk):
        assert np.isfinite(b).all(), name
        np.testing.assert_allclose(b, a, err_msg=f"d{name}", **TOL)
    return out, g_blk


BI = RelPos(NB, 128, bidirectional=True)
UNI = RelPos(NB, 128, bidirectional=False)


@pytest.mark.slow
def test_no_bias():
    _check(32, 32, BlockSizes(8, 16))


@pytest.mark.slow
def test_bidirectional_relpos():
    _check(48, 48, BlockSizes(16, 8), relpos=RelPos(NB, 16, bidirectional=True))


@pytest.mark.slow
def test_causal_unidirectional_relpos():
    _check(40, 40, BlockSizes(8, 8), relpos=UNI, causal=True)


def test_padding_with_relpos_and_scale():
    seg = _segments([[(1, 40)], [(1, 29), (0, 11)]])
    out, _ = _check(40, 40, BlockSizes(16, 16), relpos=BI, q_segment_ids=seg,
                    kv_segment_ids=seg, scale=D ** -0.5)
    np.testing.assert_array_equal(out[1, 29:], 0.0)  # padding queries see nothing


def test_packed_segments_causal():
    seg = _segments([[(1, 10), (2, 17), (3, 5)], [(1, 3), (2, 20), (0, 9)]])
    _check(32, 32, BlockSizes(8, 16), relpos=UNI, q_segment_ids=seg, kv_segment_ids=seg,
           causal=True)


@pytest.mark.slow
def test_ragged_cross_attention():
    qs = _segments([[(1, 37)], [(1, 30), (0, 7)]])
    ks = _segments([[(1, 24), (0, 3)], [(1, 27)]])
    _check(37, 27, BlockSizes(16, 8), q_segment_ids=qs, kv_segment_ids=ks)


@pytest.mark.slow
def test_fully_padded_row():
    seg = _segments([[(1, 24)], [(0, 24)]])
    out, grads = _check(24, 24, BlockSizes(8, 8), relpos=BI, q_segment_ids=seg,
                        kv_segment_ids=seg)
    np.testing.assert_array_equal(out[1], 0.0)
    for g in grads:
        assert np.isfinite(g).all()


def test_validation():
    q, k, v, table, _ = _inputs(16, 16)
    with pytest.raises(ValueError, match="k and v"):
        blockwise_attention(q, k, v[:, :8])
    with pytest.raises(ValueError, match="bias_table"):
        blockwise_attention(q, k, v, bias_table=table)
    with pytest.raises(ValueError, match="bias_table must be"):
        blockwise_attention(q, k, v, bias_table=table[:4], relpos=BI)
    with pytest.raises(ValueError, match="q_segment_ids"):
        blockwise_attention(q, k, v, q_segment_ids=jnp.ones((B, 5), jnp.int32))
    with pytest.raises(ValueError, match="block_q"):
        BlockSizes(block_q=0)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_jaxmt_attention(causal):
    """The reference equals MultiHeadAttention with the dense bias of a Masking (the
    ``xla`` path), whose table comes from RelativePositionBias."""
    b, l, e = B, 24, H * D
    seg = _segments([[(1, 10), (2, 14)], [(1, 17), (0, 7)]])
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    x = jax.random.normal(ks[0], (b, l, e))
    wk = jax.random.normal(ks[1], (e, H, D)) * e ** -0.5
    wv = jax.random.normal(ks[2], (e, H, D)) * e ** -0.5
    eye = jnp.eye(e)  # identity query/output projections expose the attention core
    params = {"query": eye.reshape(e, H, D), "key": wk, "value": wv, "out": eye.reshape(H, D, e)}
    relpos = RelPos(NB, 64, bidirectional=not causal)
    rpb = RelativePositionBias(NB, 64, H, bidirectional=not causal)
    pos = jnp.arange(l)
    rp_params = rpb.init(ks[3], pos, pos)
    table = jax.tree_util.tree_leaves(rp_params)[0]
    bias = dense_bias(Masking(seg, seg, rpb.apply(rp_params), impl="xla", causal=causal,
                              relpos=relpos), l, l)  # [b, h, l, l]
    ones = jnp.ones_like(seg)  # no masking: the table path gives the dense module's bias
    np.testing.assert_array_equal(
        np.asarray(dense_bias(Masking(ones, ones, rpb.apply(rp_params), relpos=relpos), l, l)),
        np.broadcast_to(np.asarray(rpb.apply(rp_params, pos, pos)), (b, H, l, l)))
    mha = MultiHeadAttention(num_heads=H, head_dim=D, emb_dim=e)
    want = mha.apply({"params": params}, x, x, bias, True).reshape(b, l, H, D)

    q = x.reshape(b, l, H, D)
    k, v = jnp.einsum("ble,ehd->blhd", x, wk), jnp.einsum("ble,ehd->blhd", x, wv)
    got = reference_attention(q, k, v, bias_table=table, relpos=relpos, q_segment_ids=seg,
                              kv_segment_ids=seg, causal=causal)
    valid = np.asarray(seg > 0)  # jaxmt averages over all keys on fully masked rows
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], **TOL)
    blk = blockwise_attention(q, k, v, bias_table=table, relpos=relpos, q_segment_ids=seg,
                              kv_segment_ids=seg, causal=causal, block_sizes=BlockSizes(8, 8))
    np.testing.assert_allclose(np.asarray(blk)[valid], np.asarray(want)[valid], **TOL)


def _grad_temp_bytes(fn, length, **kw):
    x = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    t = jax.ShapeDtypeStruct((NB, 2), jnp.float32)

    def loss(q, k, v, table):
        return jnp.sum(fn(q, k, v, bias_table=table, relpos=BI, **kw))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, t).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_length():
    blocks = BlockSizes(256, 256)
    ref_2k = _grad_temp_bytes(reference_attention, 2048)
    blk_2k = _grad_temp_bytes(blockwise_attention, 2048, block_sizes=blocks)
    blk_4k = _grad_temp_bytes(blockwise_attention, 4096, block_sizes=blocks)
    print(f"temp bytes: reference@2048={ref_2k} blockwise@2048={blk_2k} @4096={blk_4k}")
    assert blk_2k * 8 <= ref_2k, (ref_2k, blk_2k)
    assert blk_4k <= 2.5 * blk_2k, (blk_2k, blk_4k)
