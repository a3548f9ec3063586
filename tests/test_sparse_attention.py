"""Local (Longformer) and BigBird sparse attention vs the masked materialising reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.kernels.bigbird_attention import bigbird_attention, bigbird_mask
from jaxmt.kernels.common import RelPos, reference_attention
from jaxmt.kernels.local_attention import local_attention, local_mask

from attention_cases import make_inputs, segments as _segments

B, H, D, NB = 2, 2, 16, 32
TOL = dict(rtol=1e-5, atol=1e-5)
BI = RelPos(NB, 64, bidirectional=True)
UNI = RelPos(NB, 64, bidirectional=False)


def _inputs(length, seed=0):  # self-attention
    return make_inputs(B, H, D, NB, length, length, seed)


def _check(fn, mask, length, relpos=None, segs=None, causal=False, **kw):
    """Forward and d(q, k, v, table) of ``fn`` against reference_attention(mask=mask)."""
    q, k, v, table, ct = _inputs(length)
    table = table if relpos is not None else None
    common = dict(relpos=relpos, q_segment_ids=segs, kv_segment_ids=segs)
    if causal:
        common["causal"] = True
    argnums = (0, 1, 2, 3) if relpos is not None else (0, 1, 2)

    def both(*a):  # one compile for reference and kernel: the tests are compile-bound
        res = []
        for f in (lambda *x, **c: reference_attention(*x, mask=mask, **c),
                  lambda *x, **c: fn(*x, **kw, **c)):
            loss = lambda *x: jnp.sum(f(*x[:3], bias_table=x[3], **common) * ct)  # noqa: E731
            res += [f(*a[:3], bias_table=a[3], **common), jax.grad(loss, argnums)(*a)]
        return res

    out_ref, g_ref, out, grads = jax.jit(both)(q, k, v, table)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, out_ref, **TOL)
    for name, a, b in zip("qkvt", g_ref, grads):
        assert np.isfinite(b).all(), name
        np.testing.assert_allclose(b, a, err_msg=f"d{name}", **TOL)
    return out


def _local(length, window, global_tokens=0, causal=False, block_size=None, **kw):
    mask = local_mask(length, window, global_tokens, causal)
    return _check(local_attention, mask, length, causal=causal, window=window,
                  global_tokens=global_tokens, block_size=block_size, **kw)


def _bigbird(length, block_size=16, window_blocks=3, global_blocks=1, random_blocks=2,
             seed=0, **kw):
    mask = bigbird_mask(length, block_size, window_blocks, global_blocks, random_blocks, seed)
    return _check(bigbird_attention, mask, length, block_size=block_size,
                  window_blocks=window_blocks, global_blocks=global_blocks,
                  random_blocks=random_blocks, seed=seed, **kw)


# Row 0: three packed segments and a segment-0 padding tail; row 1: one segment + padding.
SEGS = [[(1, 20), (2, 30), (3, 10), (0, 4)], [(5, 50), (0, 14)]]


# ----------------------------------------------------------------------------- local


@pytest.mark.parametrize("relpos,global_tokens", [(None, 0), (BI, 5)], ids=["nobias", "relpos"])
def test_local_bidirectional(relpos, global_tokens):
    _local(64, 8, global_tokens, relpos=relpos)


@pytest.mark.parametrize("global_tokens", [0, 3])
def test_local_causal_unidirectional_relpos(global_tokens):
    _local(77, 8, global_tokens, causal=True, relpos=UNI)  # 77: not a block multiple


def test_local_non_block_multiple_explicit_block():
    _local(50, 6, 2, relpos=BI, block_size=16)  # block larger than the window


@pytest.mark.parametrize("causal", [False, True])
def test_local_padding_and_packed_segments(causal):
    out = _local(64, 8, 4, causal=causal, relpos=UNI if causal else BI, segs=_segments(SEGS))
    np.testing.assert_array_equal(out[0, 60:], 0.0)  # padding rows output exactly 0
    np.testing.assert_array_equal(out[1, 50:], 0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_local_wide_window_is_full_attention(causal):
    q, k, v, table, _ = _inputs(48)
    rel = UNI if causal else BI
    out, ref = jax.jit(lambda *a: (
        local_attention(*a[:3], bias_table=a[3], relpos=rel, causal=causal, window=1000),
        reference_attention(*a[:3], bias_table=a[3], relpos=rel, causal=causal)))(q, k, v, table)
    np.testing.assert_allclose(out, ref, **TOL)
    assert local_mask(48, 1000, 0, causal).sum() == (48 * 49 // 2 if causal else 48 * 48)


def test_local_mask_pattern():
    m = local_mask(10, 2, 1, causal=False)
    assert m[5, 3] and m[5, 7] and not m[5, 2] and not m[5, 8]
    assert m[0].all() and m[:, 0].all()
    c = local_mask(10, 2, 1, causal=True)
    assert c[5, 3] and not c[5, 6] and c[9, 0] and not c[0, 1]


def test_local_validation():
    q = jnp.zeros((B, 32, H, D))
    with pytest.raises(ValueError, match="self-attention"):
        local_attention(q, q[:, :16], q[:, :16])
    with pytest.raises(ValueError, match="block_size"):
        local_attention(q, q, q, window=16, block_size=8)
    with pytest.raises(ValueError, match="window"):
        local_attention(q, q, q, window=-1)
    with pytest.raises(ValueError, match="global_tokens"):
        local_attention(q, q, q, global_tokens=1.5)
    with pytest.raises(ValueError, match="together"):
        local_attention(q, q, q, bias_table=jnp.zeros((NB, H)))


# ----------------------------------------------------------------------------- bigbird


def test_bigbird_relpos():
    _bigbird(128, relpos=BI)


def test_bigbird_non_block_multiple_no_bias_no_global():
    _bigbird(100, block_size=16, global_blocks=0, random_blocks=1, seed=3)


def test_bigbird_padding_and_packed_segments():
    out = _bigbird(64, block_size=8, global_blocks=2, window_blocks=1, relpos=BI,
                   segs=_segments(SEGS))
    np.testing.assert_array_equal(out[0, 60:], 0.0)
    np.testing.assert_array_equal(out[1, 50:], 0.0)


def test_bigbird_all_blocks_is_full_attention():
    q, k, v, table, _ = _inputs(48)
    out, ref = jax.jit(lambda *a: (  # 3 blocks: the window covers them all
        bigbird_attention(*a[:3], bias_table=a[3], relpos=BI, block_size=16, random_blocks=0),
        reference_attention(*a[:3], bias_table=a[3], relpos=BI)))(q, k, v, table)
    np.testing.assert_allclose(out, ref, **TOL)
    assert bigbird_mask(48, 16, 3, 1, 0, 0).all()


def test_bigbird_mask_pattern():
    m = bigbird_mask(128, 8, 3, 1, 2, seed=7)  # 16 blocks
    blocks = m[::8, ::8]
    assert blocks[0].all() and blocks[:, 0].all()  # global query / key block
    counts = blocks[1:].sum(1)
    assert (counts <= 6).all() and (counts[1:-1] == 6).all()  # 3 window + 1 global + 2 random
    assert (bigbird_mask(128, 8, 3, 1, 2, seed=7) == m).all()  # deterministic
    assert (bigbird_mask(128, 8, 3, 1, 2, seed=8) != m).any()  # seed matters


def test_bigbird_validation():
    q = jnp.zeros((B, 32, H, D))
    with pytest.raises(ValueError, match="encoder self-attention"):
        bigbird_attention(q, q, q, causal=True)
    with pytest.raises(ValueError, match="encoder self-attention"):
        bigbird_attention(q, q[:, :16], q[:, :16])
    with pytest.raises(ValueError, match="odd"):
        bigbird_attention(q, q, q, block_size=8, window_blocks=2)
    with pytest.raises(ValueError, match="block_size"):
        bigbird_attention(q, q, q, block_size=0)


# ----------------------------------------------------------------------------- memory


def _temp_bytes(fn, length):
    """Compiled temp memory of forward + backward (d q, k, v, table) at batch 1."""
    x = jax.ShapeDtypeStruct((1, length, H, D), jnp.float32)
    t = jax.ShapeDtypeStruct((NB, H), jnp.float32)
    grad = jax.grad(lambda q, k, v, tb: jnp.sum(fn(q, k, v, bias_table=tb, relpos=BI)),
                    (0, 1, 2, 3))
    return jax.jit(grad).lower(x, x, x, t).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_memory_grows_linearly():
    fns = {"local": lambda *a, **kw: local_attention(*a, window=64, global_tokens=4, **kw),
           "bigbird": lambda *a, **kw: bigbird_attention(*a, block_size=64, **kw),
           "reference": reference_attention}
    ratio = {name: _temp_bytes(fn, 2048) / _temp_bytes(fn, 1024) for name, fn in fns.items()}
    assert ratio["reference"] > 2.6, ratio  # the probe does see quadratic growth
    assert ratio["local"] < 2.6, ratio
    assert ratio["bigbird"] < 2.6, ratio
