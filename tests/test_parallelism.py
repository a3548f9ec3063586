"""Every mesh preset computes what one device computes; gradient accumulation gives the
full batch's update with less memory; checkpoints restore across meshes.

All on the 8 fake CPU devices from conftest, in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.checkpoint import Checkpointer
from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.gin_files import MESH_PRESETS, mesh_preset
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.trainer import Trainer

from compile_cache import persistent_compile_cache

pytestmark = pytest.mark.slow  # `make test-fast` skips these

# Heads, MLP units and vocabulary divide by 8, so even `tp` uses all 8 devices.
CFG = ModelConfig(vocab_size=256, emb_dim=32, num_heads=8, head_dim=4, mlp_dim=64,
                  num_encoder_layers=1, num_decoder_layers=1, precision="fp32")
SRC = TGT = 16
# The microbatch tests' full batch (4 microbatches of 8 rows, one per device): their
# one-batch steps are then the presets' steps, loaded from the compilation cache.
BATCH = 32
TC = TrainConfig(batch_size=BATCH, optimizer="adamw", learning_rate=3e-3, warmup_steps=1,
                 steps=100)


@pytest.fixture(scope="module", autouse=True)
def _compile_once(tmp_path_factory):
    """Every Trainer jits afresh; the tests below build the same one (the same mesh,
    model and shapes: its init, its step) several times over, so load those from a
    persistent cache instead of compiling them again."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _one_device() -> Partitioner:
    return Partitioner(MeshConfig(data=1), devices=jax.devices()[:1])


def _batch(seed=0, batch=BATCH):
    b = EncoderDecoderModel(CFG).random_batch(batch, SRC, TGT, seed)
    # Ragged padding, so the token count differs between rows and microbatches.
    lengths = np.random.default_rng(seed).integers(4, TGT + 1, batch)
    pad = np.arange(TGT)[None, :] >= lengths[:, None]
    for k in ("decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids"):
        b[k] = np.where(pad, 0, b[k])
    return b


def _loss_and_grads(tr: Trainer, state, batch):
    p = tr.partitioner
    fn = p.jit(tr.loss_and_grads,
               in_shardings=(tr.state_shardings, p.batch_sharding, p.replicated),
               out_shardings=(p.replicated, p.replicated, tr.grad_shardings))
    return fn(state, p.shard_batch(batch, tr.cfg.batch_size), jax.random.PRNGKey(0))


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _first_step_grads(state, metrics):
    """The gradients of a first step, recovered from the state it leaves: AdamW's first
    moment is then (1 - b1) times the gradients clipped by global norm to
    TrainConfig.grad_clip (the `reference` fixture checks this against loss_and_grads),
    and the step reports that norm. So the step alone shows its gradients: no second
    compilation of the forward and backward pass per mesh."""
    scale = (1 - 0.9) * min(1.0, TC.grad_clip / float(metrics["grad_norm"]))
    return jax.tree.map(lambda m: m / scale, _host(state.opt_state[1][0].mu))


@pytest.fixture(scope="module")
def reference():
    """Loss, gradients and the parameters after one step, on a single device."""
    tr = Trainer(CFG, TC, _one_device(), SRC, TGT)
    state = tr.init_state(0)
    loss, _, grads = _loss_and_grads(tr, state, _batch())
    state, metrics = tr.step_fn()(state, tr.partitioner.shard_batch(_batch(), BATCH),
                                  jax.random.PRNGKey(0))
    grads = _host(grads)
    _assert_trees_close(_first_step_grads(state, metrics), grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    return float(loss), grads, _host(state.params)


@pytest.mark.parametrize("preset", MESH_PRESETS)
def test_preset_matches_one_device(preset, reference):
    """The same loss, gradients (through the optimizer state, see _first_step_grads)
    and updated parameters as one device, and the preset's layout."""
    ref_loss, ref_grads, ref_params = reference
    p = Partitioner(mesh_preset(preset))
    assert np.prod(p.shape) == 8
    tr = Trainer(CFG, TC, p, SRC, TGT)
    state, metrics = tr.step_fn()(tr.init_state(0), p.shard_batch(_batch(), BATCH),
                                  jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
    _assert_trees_close(_first_step_grads(state, metrics), ref_grads)
    _assert_trees_close(_host(state.params), ref_params)
    # The updated state keeps the preset's layout: what the memory figures assume.
    q = state.params["encoder"]["layers_0"]["attention"]["query"]  # [embed, heads, kv]
    mu = state.opt_state[1][0].mu["encoder"]["layers_0"]["attention"]["query"]
    expected = {"dp": ((None, None, None), (None, None, None)),
                "zero1": ((None, None, None), ("fsdp", None, None)),
                "fsdp": (("fsdp", None, None), ("fsdp", None, None)),
                "tp": ((None, "tensor", None), (None, "tensor", None)),
                "fsdp_tp": (("fsdp", "tensor", None), ("fsdp", "tensor", None))}[preset]
    norm = lambda spec: tuple(spec) + (None,) * (3 - len(spec))
    assert (norm(q.sharding.spec), norm(mu.sharding.spec)) == expected


def test_scanned_stack_under_fsdp_tp_matches_one_device():
    """The stacked `layers` axis stays whole; the same loss and gradients."""
    cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": True, "num_encoder_layers": 2,
                         "num_decoder_layers": 2})
    out = []
    for p in (_one_device(), Partitioner(mesh_preset("fsdp_tp"))):
        tr = Trainer(cfg, TC, p, SRC, TGT)
        loss, _, grads = _loss_and_grads(tr, tr.init_state(0), _batch())
        out.append((float(loss), _host(grads)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
    _assert_trees_close(out[0][1], out[1][1])


@pytest.mark.parametrize("mesh", ["dp", "zero1", "replica2_data2_fsdp2"])
def test_microbatches_give_the_full_batch_update(mesh):
    """4 microbatches of 8 rows: the same loss, metrics and updated parameters as one
    batch of 32 (the loss weights differ per row, so the normalisation matters). Over
    `replica`/`data` each shard keeps its own gradient sum (a vmapped path); over
    `fsdp` the sums are sharded; the mixed mesh takes both."""
    mesh_cfg = (MeshConfig(replica=2, data=2, fsdp=2) if mesh.startswith("replica")
                else mesh_preset(mesh))
    tc = TrainConfig(**{**TC.__dict__, "batch_size": 32})
    assert tc == TC  # n = 1 is then the step test_preset_matches_one_device compiled
    batch = _batch(1, 32)
    results = []
    for n in (1, 4):
        p = Partitioner(mesh_cfg)
        tr = Trainer(CFG, TrainConfig(**{**tc.__dict__, "num_microbatches": n}), p, SRC, TGT)
        state, metrics = tr.step_fn()(tr.init_state(0), p.shard_batch(batch, 32),
                                      jax.random.PRNGKey(0))
        results.append((_host(metrics), _host(state.params)))
    (m1, p1), (m4, p4) = results
    for k in ("loss", "grad_norm", "tokens", "correct", "nll_sum"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
    _assert_trees_close(p4, p1)


def test_microbatch_gradients_accumulate_in_float32():
    """bfloat16 parameters, float32 accumulator: the scan carries only float32 grads."""
    cfg = ModelConfig(**{**CFG.__dict__, "precision": "bf16_params"})
    tr = Trainer(cfg, TrainConfig(**{**TC.__dict__, "batch_size": 32, "num_microbatches": 4}),
                 Partitioner(mesh_preset("fsdp")), SRC, TGT)
    batch = {k: jnp.asarray(v) for k, v in _batch(0, 32).items()}
    jaxpr = tr.partitioner.jit(tr.loss_and_grads).trace(
        tr.abstract_state, batch, jax.random.PRNGKey(0)).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 4
    n_params = len(jax.tree.leaves(tr.abstract_state.params))
    carry = [v.aval for v in scans[0].outvars][-n_params:]  # loss, metrics, then grads
    assert {str(a.dtype) for a in carry} == {"float32"}
    # ... and handed to the optimizer in the parameters' dtype.
    grads = jax.eval_shape(tr.loss_and_grads, tr.abstract_state, batch, jax.random.PRNGKey(0))[2]
    assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"bfloat16"}


def test_peak_temp_memory_falls_with_microbatches():
    """XLA's own per-device figure for the compiled step (activations dominate here)."""
    cfg = ModelConfig(**{**CFG.__dict__, "vocab_size": 1024})
    temps = []
    for n in (1, 2, 4):
        tc = TrainConfig(**{**TC.__dict__, "batch_size": 64, "num_microbatches": n})
        tr = Trainer(cfg, tc, Partitioner(mesh_preset("dp")), 64, 64)
        temps.append(tr.compile_step(64, 64).memory_analysis().temp_size_in_bytes)
    assert temps[0] > temps[1] > temps[2], temps
    assert temps[2] < 0.5 * temps[0], temps


def test_checkpoint_restores_across_meshes(tmp_path):
    """fsdp 8 -> fsdp_tp 4x2 -> 1 device: values come back exact, and training goes on
    with the losses of an uninterrupted single-device run."""
    batches = [_batch(s) for s in range(4)]
    rng = jax.random.PRNGKey(0)

    tr = Trainer(CFG, TC, _one_device(), SRC, TGT)
    state, step, expected = tr.init_state(0), tr.step_fn(), []
    for b in batches:
        state, m = step(state, tr.partitioner.shard_batch(b, BATCH), rng)
        expected.append(float(m["loss"]))

    ckpt = Checkpointer(str(tmp_path), keep=5, async_save=False)
    losses, saved = [], None
    plan = [(mesh_preset("fsdp"), None, 0, 2), (mesh_preset("fsdp_tp"), None, 2, 3),
            (MeshConfig(data=1), jax.devices()[:1], 3, 4)]
    for mesh, devices, start, stop in plan:
        p = Partitioner(mesh, devices=devices)
        tr = Trainer(CFG, TC, p, SRC, TGT)
        if start == 0:
            state = tr.init_state(0)
        else:
            state, meta = tr.restore_state(ckpt, start)
            assert meta["step"] == start and int(state.step) == start
            _assert_trees_close(_host(state.params), saved[0], rtol=0, atol=0)
            _assert_trees_close(_host(state.opt_state), saved[1], rtol=0, atol=0)
            q = state.params["encoder"]["layers_0"]["attention"]["query"]
            assert q.sharding.mesh.shape == dict(zip(("replica", "data", "fsdp", "tensor"),
                                                     p.shape))
        step = tr.step_fn()
        for i in range(start, stop):
            state, m = step(state, p.shard_batch(batches[i], BATCH), rng)
            losses.append(float(m["loss"]))
        saved = (_host(state.params), _host(state.opt_state))
        ckpt.save(stop, state.params, state.opt_state, {"step": stop})
        ckpt.wait()
    ckpt.close()
    np.testing.assert_allclose(losses, expected, rtol=2e-5)
