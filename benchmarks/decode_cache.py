"""Greedy decoding speed: jaxmt's KV cache against recomputing the decoder every step.

Both decoders run the same randomly initialised model on the same batch, in one run;
the no-cache decoder is the textbook loop that reruns the whole decoder on the padded
prefix (a static shape, so it compiles once). Random weights rarely emit EOS, so both
generate the full length: the figures are for max-length generation.

    python benchmarks/decode_cache.py [--model tiny|small] [--batch 32] [--src_len 64]
        [--decode_len 64] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.config import ModelConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.network import EncoderDecoder

MODELS = {
    "tiny": ModelConfig(),
    "small": ModelConfig(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                         num_encoder_layers=8, num_decoder_layers=8),
}


def no_cache_decode(module, params, enc, decode_len):
    """Greedy decoding that reruns the decoder over the whole prefix at every step."""
    b = enc.shape[0]
    enc_seg = (enc > 0).astype(jnp.int32)
    encoded = module.apply({"params": params}, enc, enc_seg, method=EncoderDecoder.encode)

    def body(i, out):
        dec_in = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), out[:, :-1]], 1)
        logits = module.apply({"params": params}, dec_in, encoded, enc_seg,
                              method=EncoderDecoder.decode)  # [b, L, v]
        nxt = jnp.argmax(jax.lax.dynamic_slice_in_dim(logits, i, 1, axis=1)[:, 0], -1)
        return jax.lax.dynamic_update_slice(out, nxt[:, None].astype(jnp.int32), (0, i))

    return jax.lax.fori_loop(0, decode_len, body, jnp.zeros((b, decode_len), jnp.int32))


def timed(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def random_setup(model_name: str, batch: int, src_len: int, precision: str | None = None):
    """A randomly initialised model of ``MODELS`` (in ``precision``, default its own), its
    parameters, and a batch of random sources (no EOS: random weights then decode to the
    full length)."""
    cfg = MODELS[model_name]
    model = EncoderDecoderModel(cfg if precision is None else
                                dataclasses.replace(cfg, precision=precision))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))
    rng = np.random.default_rng(0)
    enc = rng.integers(3, model.cfg.vocab_size, (batch, src_len)).astype(np.int32)
    return model, params, {"encoder_input_tokens": enc}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--src_len", type=int, default=64)
    ap.add_argument("--decode_len", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    model, params, batch = random_setup(a.model, a.batch, a.src_len)
    plain = jax.jit(no_cache_decode, static_argnums=(0, 3))
    with_cache = lambda: model.predict_batch(params, batch, max_decode_len=a.decode_len)
    without = lambda: model.predict_batch(params, batch, decode_fn=plain,
                                          decode_len=a.decode_len)
    cached, recompute = timed(with_cache), timed(without)
    # Exact equality holds in fp32 (tests/test_decoding.py); in bf16 the one-token and
    # full-prefix shapes round differently, so near-tied argmaxes of a random model can flip.
    agree = float(np.mean(np.asarray(with_cache()) == np.asarray(without())))
    ntok = a.batch * a.decode_len
    res = {"model": a.model, "batch": a.batch, "src_len": a.src_len, "decode_len": a.decode_len,
           "kv_cache_tokens_per_s": round(ntok / cached, 1),
           "recompute_tokens_per_s": round(ntok / recompute, 1),
           "ratio_vs_recompute": round(recompute / cached, 2), "token_agreement": round(agree, 3)}
    print(f"{a.model} model, batch {a.batch}, source {a.src_len}, {a.decode_len} new tokens "
          f"on {jax.devices()[0].platform}")
    print(f"  KV cache : {res['kv_cache_tokens_per_s']:>9.1f} tokens/s")
    print(f"  recompute: {res['recompute_tokens_per_s']:>9.1f} tokens/s")
    print(f"  speed-up : {res['ratio_vs_recompute']:.2f}x  (token agreement: {agree:.3f})")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
