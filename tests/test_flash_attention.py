"""Pallas flash attention (in-kernel T5 bias) vs the materialising reference.

Everything runs in Pallas interpret mode on CPU: backend="gpu" is the Triton-style
kernel, backend="tpu" the Mosaic one (TPU interpret mode). The last two tests lower
the real kernels ahead of time (Mosaic through libtpu, Triton to its IR), with 64x32
tiles and with each backend's default tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxmt.config import AttentionConfig
from jaxmt.kernels.common import BlockSizes, RelPos, reference_attention
from jaxmt.kernels.flash_attention import default_block_sizes, far_config, flash_attention
from jaxmt.modeling.attention import Masking, attend

from attention_cases import make_inputs, segments as _segments

B, H, D, NB = 2, 2, 16, 12  # 12 buckets: the kernel pads the table row to 16
TOL = dict(rtol=1e-5, atol=1e-5)
BI = RelPos(NB, 24, bidirectional=True)
UNI = RelPos(NB, 24, bidirectional=False)
BACKENDS = ["gpu", pytest.param("tpu", marks=pytest.mark.slow)]  # gpu alone in make test-fast


def _inputs(lq, lk, d=D, seed=0):
    return make_inputs(B, H, d, NB, lq, lk, seed)


def _out_and_grads(fn, q, k, v, table, ct, **kw):
    """One jit per attention function: output and its vjp on ``ct`` for (q, k, v, table)."""

    @jax.jit
    def run(q, k, v, table, ct):
        out, vjp = jax.vjp(lambda q, k, v, t: fn(q, k, v, bias_table=t, **kw), q, k, v, table)
        return out, vjp(ct)

    return run(q, k, v, table, ct)


def _check(lq, lk, blocks, backend="gpu", relpos=None, d=D, table_tol_of_max=False, **kw):
    """backend="gpu" passes interpret=True; "tpu" runs the plain call under pltpu's
    force_tpu_interpret_mode (TPU interpret mode simulates TPU memory spaces).

    ``table_tol_of_max``: the table gradient's atol is 1e-5 of its largest entry (long
    sequences sum ~len^2 float32 terms per bucket, so both sides round at that scale)."""
    q, k, v, table, ct = _inputs(lq, lk, d)
    table = table if relpos is not None else None
    ref, g_ref = _out_and_grads(reference_attention, q, k, v, table, ct, relpos=relpos, **kw)
    flash = dict(relpos=relpos, block_sizes=blocks, backend=backend, **kw)
    if backend == "tpu":
        with pltpu.force_tpu_interpret_mode():
            out, g = _out_and_grads(flash_attention, q, k, v, table, ct, **flash)
    else:
        out, g = _out_and_grads(flash_attention, q, k, v, table, ct, interpret=True, **flash)
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(out, ref, **TOL)
    for name, a, b in zip("qkvt", g_ref, g):
        if a is None:
            continue
        assert np.isfinite(b).all(), name
        tol = TOL
        if name == "t" and table_tol_of_max:
            tol = dict(TOL, atol=TOL["atol"] * float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, err_msg=f"d{name}", **tol)
    return out, g


def test_no_bias():
    _check(32, 32, BlockSizes(16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_relpos(backend):
    _check(48, 48, BlockSizes(16, 32), backend, relpos=BI, d=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_unidirectional_relpos(backend):
    _check(64, 64, BlockSizes(16, 16), backend, relpos=UNI, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional,causal", [(True, False), (False, True), (False, False)],
                         ids=["bidirectional", "causal-unidirectional", "unidirectional"])
def test_far_tile_fast_path(backend, bidirectional, causal):
    """Length 256, 32-blocks, max_distance 32: most tiles lie past bucket saturation and take
    the single-bucket path (future and past sides where visited), the diagonal ones the loop."""
    relpos = RelPos(NB, 32, bidirectional)
    far = far_config(relpos, causal, 32, 32, 8, 8)
    assert far is not None and far[2] is not None  # past far tiles are visited
    assert (far[0] is None) == causal  # future far tiles only without the causal mask
    _check(256, 256, BlockSizes(32, 32), backend, relpos=relpos, causal=causal,
           table_tol_of_max=True)


def test_padding_with_relpos_and_scale():
    seg = _segments([[(1, 48)], [(1, 29), (0, 19)]])
    out, _ = _check(48, 48, BlockSizes(16, 16), relpos=BI, q_segment_ids=seg,
                    kv_segment_ids=seg, scale=D ** -0.5)
    np.testing.assert_array_equal(out[1, 29:], 0.0)  # padding queries see nothing


def test_packed_segments_causal():
    seg = _segments([[(1, 10), (2, 17), (3, 5)], [(1, 3), (2, 20), (0, 9)]])
    _check(32, 32, BlockSizes(16, 16), relpos=UNI, q_segment_ids=seg, kv_segment_ids=seg,
           causal=True)


@pytest.mark.parametrize("backend", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
def test_ragged_cross_attention(backend):
    """q_len 40 vs k_len 24 (no block multiples), padded keys, head dim 24 (not 2^n)."""
    q_seg = _segments([[(1, 40)], [(1, 33), (0, 7)]])
    kv_seg = _segments([[(1, 24)], [(1, 19), (0, 5)]])
    _check(40, 24, BlockSizes(16, 16), backend, relpos=BI, d=24, q_segment_ids=q_seg,
           kv_segment_ids=kv_seg)


def test_fully_padded_row_is_zero_without_nan():
    """Batch row 1 has no real keys at all, and row 0 has padded queries: zeros, no NaN."""
    q_seg = _segments([[(1, 20), (0, 12)], [(1, 32)]])
    kv_seg = _segments([[(1, 32)], [(0, 32)]])
    out, (dq, dk, dv, dt) = _check(32, 32, BlockSizes(16, 16), relpos=UNI, causal=True,
                                   q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[0, 20:], 0.0)
    np.testing.assert_array_equal(dq[1], 0.0)
    np.testing.assert_array_equal(dk[1], 0.0)
    np.testing.assert_array_equal(dv[1], 0.0)


def test_validation_errors():
    q, k, v, table, _ = _inputs(32, 32)
    ok = dict(backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="bias_table and relpos"):
        flash_attention(q, k, v, bias_table=table, **ok)
    with pytest.raises(ValueError, match="bias_table must be"):
        flash_attention(q, k, v, bias_table=table[:4], relpos=BI, **ok)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        flash_attention(q, k, v[:, :16], **ok)
    with pytest.raises(ValueError, match="q_segment_ids"):
        flash_attention(q, k, v, q_segment_ids=jnp.ones((B, 31), jnp.int32), **ok)
    with pytest.raises(ValueError, match="backend must be"):
        flash_attention(q, k, v, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v, block_sizes=BlockSizes(24, 16), **ok)
    with pytest.raises(ValueError, match="multiple of 8"):
        flash_attention(q, k, v, block_sizes=BlockSizes(16, 12), backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="BlockSizes"):
        flash_attention(q, k, v, block_sizes=(16, 16), **ok)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            flash_attention(q, k, v)


# ----------------------------------------------------------------------------- real lowering


AOT_CASES = [False, True]  # causal unidirectional; bidirectional (both far sides)
AOT_IDS = ["causal-unidirectional", "bidirectional"]


AOT_BLOCKS = BlockSizes(64, 32)


def _aot_grad_fn(backend, bidirectional=False, blocks=AOT_BLOCKS, length=456, d=48):
    """Forward + backward of a packed, biased bf16 call with ragged lengths: causal and
    unidirectional, or bidirectional. Length 456 reaches past bucket saturation
    (max_distance 128), so the far-tile branch is lowered too. ``blocks=None``: the
    backend's default tiles."""
    relpos = RelPos(32, 128, bidirectional=bidirectional)
    if blocks == AOT_BLOCKS and length == 456:
        far = far_config(relpos, not bidirectional, 64, 32, 8, 15)
        assert far is not None and far[2] is not None and (far[0] is None) != bidirectional

    def loss(q, k, v, table, seg):
        out = flash_attention(q, k, v, bias_table=table, relpos=relpos, q_segment_ids=seg,
                              kv_segment_ids=seg, causal=not bidirectional, backend=backend,
                              block_sizes=blocks)
        return jnp.sum(out.astype(jnp.float32))

    s = jax.ShapeDtypeStruct
    args = ((s((2, length, 2, d), jnp.bfloat16),) * 3
            + (s((32, 2), jnp.float32), s((2, length), jnp.int32)))
    return jax.grad(loss, (0, 1, 2, 3)), args


@pytest.mark.parametrize("bidirectional", AOT_CASES, ids=AOT_IDS)
def test_mosaic_compiles_ahead_of_time_for_tpu(bidirectional):
    """Mosaic accepts all three kernels (block_k 32 < 128, head dim 48) for a v5e chip."""
    pytest.importorskip("libtpu", reason="needs the tpu_aot extra (pip install -e '.[tpu_aot]')")
    from jaxmt.sharding.partitioning import topology_devices

    sharding = jax.sharding.SingleDeviceSharding(topology_devices("v5e:2x2")[0])
    fn, args = _aot_grad_fn("tpu", bidirectional)
    compiled = jax.jit(fn, in_shardings=(sharding,) * len(args)).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("bidirectional", AOT_CASES, ids=AOT_IDS)
def test_triton_lowering_without_gpu(bidirectional):
    """The Triton lowering (to Triton IR; PTX needs a GPU compile) accepts all kernels."""
    fn, args = _aot_grad_fn("gpu", bidirectional)
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_default_tiles_per_backend():
    """Default tiles: 64x64 for Triton (a 512x512 tile's logits alone would need 2,048
    float32 registers per thread at 4 warps), 512x512 for Mosaic; AttentionConfig's
    block_size 0 (the default) leaves the choice to the kernel."""
    assert default_block_sizes("gpu") == BlockSizes(64, 64)
    assert default_block_sizes("tpu") == BlockSizes(512, 512)
    with pytest.raises(ValueError, match="backend"):
        default_block_sizes("cpu")
    assert AttentionConfig().block_size == 0
    with pytest.raises(ValueError, match="AttentionConfig.block_size"):
        AttentionConfig(block_size=-1)
    x = jax.ShapeDtypeStruct((1, 256, 2, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    def grid(block_size):  # interpret mode runs the Triton flavour
        opts = AttentionConfig(flash_interpret=True, block_size=block_size)
        return str(jax.make_jaxpr(lambda q, s: attend(q, q, q, Masking(
            s, s, None, impl="flash", causal=True, options=opts)))(x, seg))

    assert "GridMapping(grid=(1, 2, 4)" in grid(0)  # 256 / 64
    assert "GridMapping(grid=(1, 2, 8)" in grid(32)


def test_triton_lowering_with_default_tiles():
    """The default GPU tiles reach the Triton kernels: length 1024 lowers to grids of
    1024 / 64 = 16 query blocks (forward, dq) and key blocks (dk/dv), not 2 of 512."""
    fn, args = _aot_grad_fn("gpu", blocks=None, length=1024, d=64)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3
    assert text.count("grid_z = 16 : i32") == 3, "tiles are not 64"
    assert "tensor<2x16x1x64xi32>" in text  # key segments split into 64-key blocks


@pytest.mark.slow
def test_mosaic_compiles_default_tiles_ahead_of_time():
    """Mosaic compiles the default 512x512 tiles for a v5e chip (length 1024: 2 blocks)."""
    pytest.importorskip("libtpu", reason="needs the tpu_aot extra (pip install -e '.[tpu_aot]')")
    from jaxmt.sharding.partitioning import topology_devices

    sharding = jax.sharding.SingleDeviceSharding(topology_devices("v5e:2x2")[0])
    fn, args = _aot_grad_fn("tpu", blocks=None, length=1024, d=64)
    compiled = jax.jit(fn, in_shardings=(sharding,) * len(args)).lower(*args).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") == 3
    assert "s32[2,2,1,512]" in text  # key segments split into 512-key blocks
