"""The attention switch (AttentionConfig): every implementation behind one interface.

Exact implementations must give the xla reference's loss and gradients through the
whole network; approximate ones are checked against their own exact masked oracles in
test_sparse_attention.py / test_performer_attention.py, and here only for staying
finite and for what they reduce to (a window covering the input is full attention).
"""

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmt.config import AttentionConfig, MeshConfig, ModelConfig, from_json, to_json
from jaxmt.kernels import dot_product
from jaxmt.kernels.dot_product import dot_product_implementation
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.network import EncoderDecoder
from jaxmt.sharding.partitioning import Partitioner

CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=2, num_decoder_layers=2, relpos_buckets=8,
                  relpos_max_distance=16, precision="fp32")
EXACT = ("blockwise", "dot_product", "flash")


def _with(cfg, **attention):
    return dataclasses.replace(cfg, attention=AttentionConfig(**attention))


def _batch(b=2, s=40, t=24, seed=0):
    """Packed rows with padding tails: even rows hold two segments, odd rows one and padding."""
    rng = np.random.default_rng(seed)
    rows = np.arange(b) % 2
    enc_seg = np.array([[1] * 30 + [2] * (s - 30), [1] * (s - 7) + [0] * 7])[rows]
    dec_seg = np.array([[1] * 12 + [2] * (t - 12), [1] * (t - 4) + [0] * 4])[rows]
    enc = rng.integers(3, 64, (b, s)) * (enc_seg > 0)
    tgt = rng.integers(3, 64, (b, t)) * (dec_seg > 0)
    dec_in = np.concatenate([np.zeros((b, 1), np.int64), tgt[:, :-1]], 1) * (dec_seg > 0)
    return {k: jnp.asarray(v, jnp.int32) for k, v in dict(
        encoder_input_tokens=enc, encoder_segment_ids=enc_seg, decoder_input_tokens=dec_in,
        decoder_target_tokens=tgt, decoder_loss_weights=dec_seg > 0,
        decoder_segment_ids=dec_seg).items()}


def test_config_validates_resolves_and_round_trips():
    with pytest.raises(ValueError, match="AttentionConfig.cross: .*'local'"):
        AttentionConfig(cross="local")
    with pytest.raises(ValueError, match="AttentionConfig.decoder: .*'bigbird'"):
        AttentionConfig(decoder="bigbird")
    with pytest.raises(ValueError, match="AttentionConfig.cross: .*'performer'"):
        AttentionConfig(cross="performer")
    with pytest.raises(ValueError, match="ModelConfig.relpos_max_distance"):
        ModelConfig(relpos_buckets=32, relpos_max_distance=16)
    with pytest.raises(ValueError, match="AttentionConfig.auto_short"):
        AttentionConfig(auto_short="performer")
    with pytest.raises(ValueError, match="AttentionConfig.window"):
        AttentionConfig(window=0)
    a = AttentionConfig(encoder="auto", cross="auto", auto_threshold=256, auto_long="bigbird")
    assert [a.resolve("encoder", n) for n in (256, 257)] == ["xla", "bigbird"]
    assert a.resolve("cross", 1024) == "flash"  # a block pattern means nothing across sequences
    cfg = _with(CFG, encoder="local", window=32)
    assert from_json(to_json(model=cfg))["model"] == cfg
    gin.clear_config()
    try:
        gin.parse_config("AttentionConfig.encoder = 'performer'")
        assert ModelConfig().attention.encoder == "performer"  # no ModelConfig binding needed
    finally:
        gin.clear_config()


BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("args,want", [
    (("cpu", BF16, 64, 8, 8, True), ("xla", "CUDA GPU")),
    (("tpu", BF16, 64, 8, 8, True), ("xla", "CUDA GPU")),
    (("rocm", BF16, 64, 8, 8, True), ("xla", "CUDA GPU")),
    (("cuda", F32, 64, 8, 8, True), ("xla", "float16/bfloat16 inputs, got float32")),
    (("cuda", BF16, 60, 8, 8, True), ("xla", "multiple of 8, <= 128, got 60")),
    (("cuda", BF16, 192, 8, 8, True, "8.0"), ("xla", "<= 128, got 192")),
    (("cuda", BF16, 192, 8, 8, True, "9.0"), ("cudnn", "")),
    (("cuda", BF16, 264, 8, 8, True, "9.0"), ("xla", "<= 256, got 264")),
    (("cuda", BF16, 64, 7, 8, True), ("xla", "even lengths, got q 7, k 8")),
    (("cuda", BF16, 64, 7, 9, False), ("cudnn", "")),
    (("cuda", F16, 64, 8, 8, True), ("cudnn", "")),
], ids=["cpu", "tpu", "rocm", "float32", "head_dim_60", "head_dim_192_ampere",
        "head_dim_192_hopper", "head_dim_264", "odd_len_bias", "odd_len_no_bias", "float16"])
def test_dot_product_implementation_choice(args, want):
    impl, reason = dot_product_implementation(*args)
    assert impl == want[0] and want[1] in reason and bool(reason) == (impl == "xla")


def test_dot_product_asks_for_what_it_decides(monkeypatch, caplog):
    """XLA on this CPU; on a (simulated) CUDA device cuDNN for bf16, XLA for float32 with
    the reason logged once."""
    asked = []

    def spy(q, k, v, *, bias, scale, implementation):
        asked.append(implementation)
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, bias = jnp.ones((1, 8, 2, 64), F32), jnp.zeros((1, 1, 8, 8))
    dot_product.dot_product_attention(q, q, q, bias)
    monkeypatch.setattr(dot_product, "platform", lambda: ("cuda", "9.0"))
    monkeypatch.setattr(dot_product, "_logged", set())
    dot_product.dot_product_attention(q.astype(BF16), q.astype(BF16), q.astype(BF16), bias)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            dot_product.dot_product_attention(q, q, q, bias)
    assert asked == ["xla", "cudnn", "xla", "xla"]
    assert [r.getMessage() for r in caplog.records] == [
        "dot_product attention runs on XLA: cuDNN takes float16/bfloat16 inputs, got float32"]


@pytest.mark.slow
@pytest.mark.parametrize("impl,scan", [(i, False) for i in EXACT] + [("blockwise", True)])
def test_exact_impls_match_xla_loss_and_gradients(impl, scan):
    """Packed, padded batch with the relative bias in both stacks, fp32: the loss and every
    parameter gradient (the relative bias tables included) equal the xla path's; also
    through nn.scan with remat (the Masking is broadcast to the scanned layers)."""
    batch = _batch()
    cfg = dataclasses.replace(CFG, scan_layers=scan, encoder_remat="full" if scan else "none",
                              decoder_remat="dots_saveable" if scan else "none")
    ref_model = EncoderDecoderModel(cfg)
    params = nn.unbox(ref_model.init(jax.random.PRNGKey(0), batch))
    model = EncoderDecoderModel(_with(cfg, encoder=impl, decoder=impl, cross=impl, block_size=16))

    def grads(m):
        return jax.jit(jax.value_and_grad(lambda p: m.loss(p, batch, dropout_rng=None)[0]))(params)

    (want_loss, want), (got_loss, got) = grads(ref_model), grads(model)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))
    table = params["encoder"]["relpos_bias"]["rel_embedding"]
    assert np.abs(np.asarray(got["encoder"]["relpos_bias"]["rel_embedding"])).sum() > 0, table.shape


@pytest.mark.slow
def test_auto_switches_by_length():
    """auto = the short implementation up to the threshold, the long one above it."""
    cfg = _with(CFG, encoder="auto", auto_threshold=32, auto_long="local", window=4)
    local = _with(CFG, encoder="local", window=4)
    for s, same_as in ((32, CFG), (40, local)):
        batch = _batch(s=s)
        params = EncoderDecoder(CFG).init(jax.random.PRNGKey(1), batch)
        got = EncoderDecoder(cfg).apply(params, batch)
        want = EncoderDecoder(same_as).apply(params, batch)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    full = EncoderDecoder(CFG).apply(params, batch)  # the long input really was windowed
    assert np.abs(np.asarray(got) - np.asarray(full)).max() > 1e-3


def _train_copy_model(steps=150, length=48):
    """A tiny model trained to reverse random sequences: attention must be sharp and
    reach across the input, so a wrong implementation shows in the loss."""
    cfg = dataclasses.replace(CFG, num_encoder_layers=1, num_decoder_layers=1)
    model = EncoderDecoderModel(cfg)
    rng = np.random.default_rng(0)

    def batch(n):
        src = rng.integers(3, 20, (n, length)).astype(np.int32)
        tgt = src[:, ::-1].copy()
        ones = np.ones((n, length), np.int32)
        dec_in = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], 1)
        return dict(encoder_input_tokens=src, encoder_segment_ids=ones, decoder_input_tokens=dec_in,
                    decoder_target_tokens=tgt, decoder_loss_weights=ones, decoder_segment_ids=ones)

    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch(1)))
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, b):
        loss, g = jax.value_and_grad(lambda p: model.loss(p, b, dropout_rng=None)[0])(params)
        upd, state = opt.update(g, state)
        return optax.apply_updates(params, upd), state, loss

    first = None
    for _ in range(steps):
        params, state, loss = step(params, state, batch(16))
        first = float(loss) if first is None else first
    return cfg, params, batch(32), first, float(loss)


@pytest.mark.slow
def test_swapping_impl_in_a_trained_model():
    """Exact implementations keep a trained model's loss within 1e-5; a window covering
    the input is exact too; the approximations stay finite (their error is measured in
    benchmarks/attention_quality.py)."""
    cfg, params, held_out, first, last = _train_copy_model()
    assert last < 0.7 * first, (first, last)  # it learned something attention-dependent

    def loss(**attention):
        m = EncoderDecoderModel(_with(cfg, block_size=16, **attention))
        return float(jax.jit(lambda p: m.loss(p, held_out, dropout_rng=None)[0])(params))

    ref = loss()
    for impl in EXACT:
        assert abs(loss(encoder=impl, decoder=impl, cross=impl) - ref) <= 1e-5 * max(1, ref), impl
    assert abs(loss(encoder="local", decoder="local", window=48) - ref) <= 1e-5 * max(1, ref)
    narrow = loss(encoder="local", window=2)
    assert np.isfinite(narrow) and narrow > ref + 1e-3  # reversal needs the far end of the input
    for attention in (dict(encoder="bigbird", bigbird_block=8), dict(encoder="performer"),
                      dict(decoder="performer")):
        assert np.isfinite(loss(**attention)), attention


@pytest.mark.slow
def test_pallas_flash_under_a_mesh_matches_xla():
    """On a 2x2x2 (data, fsdp, tensor) mesh of 8 devices the Pallas kernel (interpret mode)
    runs per shard in a shard_map over batch and heads, and the network's output equals
    the xla path's; a Trainer with it builds on that mesh."""
    cfg = dataclasses.replace(CFG, num_encoder_layers=1, num_decoder_layers=1)
    flash = _with(cfg, encoder="flash", decoder="flash", cross="flash", block_size=16,
                  flash_interpret=True)
    batch = _batch(b=4, s=32, t=16)
    part = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2))
    params = part.jit(EncoderDecoder(cfg).init)(jax.random.PRNGKey(2), batch)
    want = part.jit(EncoderDecoder(cfg).apply)(params, batch)
    got = part.jit(EncoderDecoder(flash).apply)(params, batch)
    valid = np.asarray(batch["decoder_segment_ids"] > 0)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5)
    # The Trainer's init traces a one-row batch, which the mesh cannot split: the kernel
    # then takes the whole arrays (shard_map refused that shape, on GPUs and TPUs too).
    from jaxmt.config import TrainConfig
    from jaxmt.train.trainer import Trainer

    trainer = Trainer(flash, TrainConfig(batch_size=4), part, 32, 16)
    assert jax.tree.leaves(trainer.abstract_state)


def test_a_tpu_compile_from_this_host_gets_the_pallas_kernel():
    """A Partitioner over a TPU topology's devices traces kernels for TPU, so a train step
    compiled ahead of time from this CPU host runs flash as the Mosaic kernel (what the
    planner's verification must measure), while the same Trainer on CPU devices runs its
    blockwise twin; the platform holds only inside the Partitioner's scope."""
    pytest.importorskip("libtpu", reason="needs the tpu_aot extra (pip install -e '.[tpu_aot]')")
    from jaxmt.config import TrainConfig
    from jaxmt.kernels.common import target_platform
    from jaxmt.modeling.attention import runs_as
    from jaxmt.sharding.partitioning import topology_devices
    from jaxmt.train.trainer import Trainer

    cfg = dataclasses.replace(CFG, num_encoder_layers=1, num_decoder_layers=1, precision="bf16")
    flash = _with(cfg, encoder="flash", decoder="flash", cross="flash")
    mesh = MeshConfig(data=2, fsdp=2)
    texts = {}
    for name, devices in (("tpu", topology_devices("v5e:2x2")), ("cpu", jax.devices()[:4])):
        part = Partitioner(mesh, devices=devices)
        assert part.platform == name
        trainer = Trainer(flash, TrainConfig(batch_size=4), part, 128, 64)
        texts[name] = trainer.compile_step(128, 64).as_text()
    # Encoder self, decoder self and cross attention: a forward and two backward kernels each.
    assert texts["tpu"].count("tpu_custom_call") == 9
    assert "tpu_custom_call" not in texts["cpu"]
    assert target_platform() == "cpu" and runs_as("flash", flash.attention) == "blockwise"


def test_cli_inference_flags_choose_the_encoder_attention():
    # Only the encoder's implementation: the trained windows, decoder and cross settings
    # stay (tests/test_cli_errors.py checks that on a model directory).
    from jaxmt.cli import build_parser
    from jaxmt.cli.model_commands import check_inference_flags, inference_options
    from jaxmt.inference.translator import with_encoder_attention

    args = build_parser().parse_args(["translate", "--model_dir", "m", "--attention", "local",
                                      "--max_len", "1024"])
    assert inference_options(args) == dict(max_src_len=1024, max_decode_len=1024,
                                           encoder_attention="local")
    trained = ModelConfig(attention=AttentionConfig(decoder="flash", window=64))
    assert with_encoder_attention(trained, "local").attention == AttentionConfig(
        encoder="local", decoder="flash", window=64)
    bad = build_parser().parse_args(["eval", "--model_dir", "m", "--attention", "sparse"])
    with pytest.raises(SystemExit, match="--attention=sparse: unknown implementation"):
        check_inference_flags(bad)


def test_long_inputs_gin_file_binds_the_switch():
    from jaxmt.gin_files import parse_gin

    gin.clear_config()
    try:
        parse_gin(["attention/long_inputs.gin"], ["--gin.AUTO_THRESHOLD=1024"])
        a = ModelConfig().attention
    finally:
        gin.clear_config()
    assert (a.encoder, a.auto_threshold, a.auto_long, a.decoder) == ("auto", 1024, "local", "flash")
    assert [a.resolve("encoder", n) for n in (1024, 2048)] == ["flash", "local"]
