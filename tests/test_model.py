"""Model shapes, parameter counts against the closed-form formula, and the mixed-precision
einsum's hand-written backward against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.config import ModelConfig
from jaxmt.kernels.common import relative_bucket
from jaxmt.modeling.layers import mixed_einsum
from jaxmt.modeling.model import EncoderDecoderModel, cross_entropy

import flax.linen as nn

TINY = ModelConfig(vocab_size=320, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                   num_encoder_layers=2, num_decoder_layers=3, precision="fp32")


def expected_params(c: ModelConfig) -> int:
    e, hd, m, n_act = c.emb_dim, c.num_heads * c.head_dim, c.mlp_dim, len(c.mlp_activations)
    attn = 4 * e * hd
    mlp = n_act * e * m + m * e
    enc_layer = attn + mlp + 2 * e
    dec_layer = 2 * attn + mlp + 3 * e
    relpos = c.relpos_buckets * c.num_heads
    return (c.vocab_size * e  # shared input embedding
            + c.num_encoder_layers * enc_layer + relpos + e
            + c.num_decoder_layers * dec_layer + relpos + e
            + e * c.vocab_size)  # untied output layer


@pytest.mark.parametrize("cfg", [TINY, ModelConfig(), ModelConfig(vocab_size=32128, emb_dim=512,
                                 num_heads=6, head_dim=64, mlp_dim=1024, num_encoder_layers=8,
                                 num_decoder_layers=8)])
def test_param_count_matches_formula(cfg):
    model = EncoderDecoderModel(cfg)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                        model.dummy_batch(2, 8, 8))))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == expected_params(cfg)


def test_every_param_has_logical_axes():
    model = EncoderDecoderModel(TINY)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), model.dummy_batch(2, 8, 8)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim
        assert set(x.names) <= {"vocab", "embed", "mlp", "heads", "kv", "layers", "relpos_buckets"}


@pytest.mark.slow
def test_logits_shape_and_packing_isolation():
    """Logits are [b, t, vocab]; changing one packed segment leaves the other's logits alone."""
    model = EncoderDecoderModel(TINY)
    rng = np.random.default_rng(0)
    b, s, t = 2, 12, 10
    enc = rng.integers(3, 320, (b, s)).astype(np.int32)
    dec = rng.integers(3, 320, (b, t)).astype(np.int32)
    enc_seg = np.array([[1] * 6 + [2] * 6] * b, np.int32)
    dec_seg = np.array([[1] * 5 + [2] * 5] * b, np.int32)
    batch = dict(encoder_input_tokens=enc, encoder_segment_ids=enc_seg,
                 decoder_input_tokens=dec, decoder_segment_ids=dec_seg)
    # Jitted: op by op, every primitive of a new shape compiles on its own.
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(b, s, t)))
    logits = jax.jit(model.logits)(params, batch)
    assert logits.shape == (b, t, 320) and logits.dtype == jnp.float32
    enc2 = enc.copy(); enc2[:, 8] = 5  # segment 2 of the source
    dec2 = dec.copy(); dec2[:, 7] = 5  # segment 2 of the target
    logits2 = jax.jit(model.logits)(params, dict(batch, encoder_input_tokens=enc2,
                                                          decoder_input_tokens=dec2))
    np.testing.assert_allclose(logits[:, :5], logits2[:, :5], atol=1e-5)
    assert not np.allclose(logits[:, 5:], logits2[:, 5:], atol=1e-3)


@pytest.mark.parametrize("eq", ["ble,em->blm", "bqe,ehd->bqhd", "bqhd,bkhd->bhqk",
                                "bhqk,bkhd->bqhd", "bqhd,hde->bqe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_einsum_grads_match_autodiff(eq, dtype):
    sizes = dict(b=2, l=3, q=3, k=5, h=2, d=4, e=6, m=7)
    a, bsp = eq.split("->")[0].split(",")
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(kx, [sizes[c] for c in a])
    w = jax.random.normal(kw, [sizes[c] for c in bsp])
    out_shape = jax.eval_shape(lambda: jnp.einsum(eq, x, w)).shape
    g = jax.random.normal(kg, out_shape)
    dt = jnp.dtype(dtype)
    mine = jax.grad(lambda x, w: jnp.sum(mixed_einsum(eq, x, w, dt) * g), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum(eq, x, w) * g), (0, 1))(x, w)
    tol = 1e-5 if dtype == "float32" else 5e-2
    for m, r in zip(mine, ref):
        np.testing.assert_allclose(m, r, rtol=tol, atol=tol * 3)


def test_relative_bucket_t5_values():
    rel = jnp.arange(-200, 201)
    bi = relative_bucket(rel, True, 32, 128)
    assert int(bi[200]) == 0  # offset 0
    assert int(bi.max()) <= 31 and int(bi.min()) >= 0
    uni = relative_bucket(rel, False, 32, 128)
    assert int(uni[201]) == 0  # future keys share bucket 0 (they are masked anyway)
    assert int(uni[199]) == 1 and int(uni[0]) == 31


def test_label_smoothed_loss_is_zero_for_perfect_prediction():
    v, ls = 16, 0.1
    targets = jnp.array([[3, 5]])
    low = ls / (v - 1)
    probs = jnp.full((1, 2, v), low).at[0, 0, 3].set(1 - ls).at[0, 1, 5].set(1 - ls)
    loss, _, _ = cross_entropy(jnp.log(probs), targets, jnp.ones((1, 2)), ls, 0.0)
    assert abs(float(loss)) < 1e-5


@pytest.mark.slow
def test_cross_entropy_fused_backward_matches_autodiff():
    """The loss's hand-written backward equals autodiff of the textbook formula."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 37)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 37, (2, 5)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)

    def reference(lg, ls, zl):
        log_z = jax.nn.logsumexp(lg, -1)
        log_p = lg - log_z[..., None]
        conf, low = 1.0 - ls, ls / 36
        norm = -(conf * jnp.log(conf) + 36 * low * jnp.log(low + 1e-20))
        nll = -jnp.take_along_axis(log_p, targets[..., None], -1)[..., 0]
        loss = conf * nll + low * (-jnp.sum(log_p, -1) - nll) - norm + zl * log_z ** 2
        return jnp.sum(loss * weights)

    for ls, zl in [(0.0, 0.0), (0.1, 1e-4)]:
        ours = lambda lg: cross_entropy(lg, targets, weights, ls, zl)[0]
        np.testing.assert_allclose(ours(logits), reference(logits, ls, zl), rtol=1e-5)
        np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits, ls, zl),
                                   rtol=1e-4, atol=1e-6)


def test_score_batch_is_each_rows_log_likelihood():
    """score_batch equals log_softmax picked at the targets, per row, and sums to the
    negative of the loss's unsmoothed NLL."""
    model = EncoderDecoderModel(TINY)
    # Jitted: op by op, every primitive of a new shape compiles on its own.
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))
    batch = model.random_batch(3, 9, 7, seed=1)
    batch["decoder_loss_weights"][1, 4:] = 0  # a shorter row
    got = np.asarray(jax.jit(model.score_batch)(params, batch))
    log_p = jax.nn.log_softmax(jax.jit(model.logits)(params, batch), axis=-1)
    tok = np.take_along_axis(np.asarray(log_p), batch["decoder_target_tokens"][..., None], -1)
    want = (tok[..., 0] * batch["decoder_loss_weights"]).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _, metrics = jax.jit(lambda p, b: model.loss(p, b, dropout_rng=None))(params, batch)
    np.testing.assert_allclose(-got.sum(), float(metrics["nll_sum"]), rtol=1e-5)
