"""Shared inputs for the attention-kernel tests (blockwise, flash, performer, sparse)."""

import jax
import jax.numpy as jnp


def make_inputs(b, h, d, num_buckets, lq, lk, seed=0, mag=1.0):
    """Random (q, k, v, bias table, output cotangent); q and k are scaled by ``mag``.

    The draws come from ``jax.random.split(PRNGKey(seed), 5)`` in the order q, k, v,
    table, ct, so a given (shapes, seed) always yields the same arrays.
    """
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, lq, h, d)) * mag
    k = jax.random.normal(ks[1], (b, lk, h, d)) * mag
    v = jax.random.normal(ks[2], (b, lk, h, d))
    table = jax.random.normal(ks[3], (num_buckets, h))
    ct = jax.random.normal(ks[4], (b, lq, h, d))
    return q, k, v, table, ct


def segments(rows):
    """Rows of (segment id, length) runs -> int32 [b, len]."""
    return jnp.array([sum(([s] * n for s, n in row), []) for row in rows], jnp.int32)
