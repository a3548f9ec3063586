"""Precision policies: fp16 dynamic loss scaling (skip on overflow, back-off, growth,
checkpoint round trip), that every policy trains with the dtypes it promises, and what
`train` does with "auto" (prints and records the choice; a resume keeps the stored one).
The auto rule itself is tests/test_hardware.py's."""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.train import loss_scale as scaling
from jaxmt.checkpoint import Checkpointer
from jaxmt.config import PRECISIONS, MeshConfig, ModelConfig, TrainConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.loop import train_loop
from jaxmt.train.trainer import Trainer

TINY = dict(vocab_size=320, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
            num_encoder_layers=1, num_decoder_layers=1)
B, L = 8, 8
RNG = jax.random.PRNGKey(0)


def _batch(seed=0):
    return EncoderDecoderModel(ModelConfig(**TINY)).random_batch(B, L, L, seed)


# No warm-up, so every applied step moves the parameters; growth after 3 good steps.
TRAIN = TrainConfig(batch_size=B, learning_rate=1e-2, warmup_steps=0, steps=10,
                    loss_scale_growth_interval=3, log_every=1, checkpoint_every=1)
# Overflow by construction: with this scale the loss's cotangent, cast to float16 inside
# the backward matmuls, exceeds 65504 and becomes inf (it is finite in float32).
OVERFLOW_SCALE = 2.0 ** 100


@functools.lru_cache(maxsize=None)
def _trainer(policy: str) -> Trainer:
    """One Trainer (one compiled init and step) per policy, shared across tests. fp16 runs
    on a 2x2x2 mesh, so the replicated loss scale is exercised under sharding; the other
    policies on one device, which compiles faster."""
    if policy == "fp16":
        p = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2))
    else:
        p = Partitioner(MeshConfig(), devices=jax.devices()[:1])
    return Trainer(ModelConfig(**TINY, precision=policy), TRAIN, p, L, L)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _same_bits(a, b) -> bool:
    return all(x.dtype == y.dtype and x.tobytes() == y.tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_overflow_skips_then_normal_steps_grow_the_scale():
    tr = _trainer("fp16")
    p = tr.partitioner
    step = tr.step_fn()
    batch = p.shard_batch(_batch(), B)
    state = tr.init_state(0)
    assert float(state.loss_scale.scale) == TRAIN.loss_scale_init == 2.0 ** 15
    assert state.loss_scale.scale.sharding.is_equivalent_to(p.replicated, 0)
    state = state.replace(loss_scale=tr.loss_scale_state(OVERFLOW_SCALE))
    before = _host((state.params, state.opt_state))

    state, m = step(state, batch, RNG)
    assert int(m["skipped"]) == 1
    assert _same_bits(before, _host((state.params, state.opt_state)))  # nothing applied
    assert int(state.step) == 1  # the step counter counts batches, skipped ones too
    assert float(state.loss_scale.scale) == 2.0 ** 99 == float(m["loss_scale"])
    assert int(state.loss_scale.good_steps) == 0

    state = state.replace(loss_scale=tr.loss_scale_state(2.0 ** 10))
    prev = _host((state.params, state.opt_state))
    state, m = step(state, batch, RNG)
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))
    assert not _same_bits(prev[0], _host(state.params))
    assert not _same_bits(prev[1], _host(state.opt_state))
    assert float(state.loss_scale.scale) == 2.0 ** 10 and int(state.loss_scale.good_steps) == 1

    state, m = step(state, batch, RNG)
    assert float(state.loss_scale.scale) == 2.0 ** 10 and int(state.loss_scale.good_steps) == 2
    state, m = step(state, batch, RNG)  # the 3rd good step in a row: the scale doubles
    assert int(m["skipped"]) == 0
    assert float(state.loss_scale.scale) == 2.0 ** 11 and int(state.loss_scale.good_steps) == 0
    assert int(state.step) == 4


def test_loss_scale_update_rules():
    ls = scaling.init_loss_scale(1.0, good_steps=5)
    low = scaling.update_loss_scale(ls, jnp.array(False), 10)
    assert float(low.scale) == 1.0 and int(low.good_steps) == 0  # never below 1
    top = scaling.init_loss_scale(2.0 ** 127, good_steps=9)
    top = scaling.update_loss_scale(top, jnp.array(True), 10)
    assert float(top.scale) == 2.0 ** 127  # no growth into inf
    assert bool(scaling.all_finite({"a": jnp.ones(3), "b": jnp.zeros((2, 2), jnp.bfloat16)}))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(scaling.all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, bad])}))


@pytest.mark.parametrize("field,value", [("loss_scale_init", 0.5),
                                         ("loss_scale_init", float("nan")),
                                         ("loss_scale_growth_interval", 0)])
def test_train_config_validates_loss_scale_fields(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(PRECISIONS))
def test_each_policy_trains_with_its_dtypes(policy):
    param_dtype = PRECISIONS[policy][1]
    tr = _trainer(policy)
    p = tr.partitioner
    step = tr.step_fn()
    batch = p.shard_batch(_batch(), B)
    state = tr.init_state(0)
    assert (state.loss_scale is not None) == (policy == "fp16")
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(param_dtype)}
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(param_dtype)}

    logits = jax.eval_shape(tr.model.logits, state.params, _batch())  # types only
    assert logits.shape == (B, L, TINY["vocab_size"]) and logits.dtype == jnp.float32

    losses = []
    for _ in range(8):
        state, m = step(state, batch, RNG)
        losses.append(float(m["loss"]))
        assert ("loss_scale" in m) == (policy == "fp16")
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    if policy == "fp16":  # no overflow; doubled after good steps 3 and 6
        assert int(m["skipped"]) == 0 and float(state.loss_scale.scale) == 2.0 ** 17
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(param_dtype)}


def test_bf16_loss_at_init_matches_fp32():
    """Both policies keep float32 parameters, so the same seed gives the same ones; the
    first step reports the loss before its update."""
    losses = {}
    for policy in ("fp32", "bf16"):
        tr = _trainer(policy)
        _, m = tr.step_fn()(tr.init_state(0), tr.partitioner.shard_batch(_batch(), B), RNG)
        losses[policy] = float(m["loss"])
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=1e-2)
    assert losses["bf16"] != losses["fp32"]  # bf16 compute did run


def test_loss_scale_survives_checkpoint_and_resume(tmp_path):
    tr = _trainer("fp16")
    state = tr.init_state(0)
    state = state.replace(loss_scale=tr.loss_scale_state(2.0 ** 10, good_steps=1))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    state, last = train_loop(tr, iter([_batch(1)]), str(tmp_path), ckpt, state, start_step=9,
                             progress=False)  # one step, then a checkpoint at step 10
    assert last["loss_scale"] == 2.0 ** 10 and last["skipped_steps"] == 0
    assert ckpt.latest_step() == 10
    ckpt.close()

    ckpt = Checkpointer(str(tmp_path), async_save=False)
    restored, meta = tr.restore_state(ckpt, 10)
    ckpt.close()
    assert meta["loss_scale"] == {"scale": 2.0 ** 10, "good_steps": 2}
    assert float(restored.loss_scale.scale) == float(state.loss_scale.scale) == 2.0 ** 10
    assert int(restored.loss_scale.good_steps) == int(state.loss_scale.good_steps) == 2
    assert int(restored.step) == 10
    assert restored.loss_scale.scale.sharding.is_equivalent_to(tr.partitioner.replicated, 0)
    assert _same_bits(_host(state.params), _host(restored.params))
    # The restored state steps like the original (same shardings, donation and all).
    restored, m = tr.step_fn()(restored, tr.partitioner.shard_batch(_batch(), B), RNG)
    assert int(m["skipped"]) == 0 and float(restored.loss_scale.scale) == 2.0 ** 11


def _tiny_train(model_dir, steps, precision="auto"):
    """A real `train` on the embedded corpus: 2 languages, a 1-layer model, few steps."""
    import gin
    from jaxmt.config import DataConfig
    from jaxmt.train.run import train

    gin.clear_config()
    model = ModelConfig(vocab_size=1024, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                        num_encoder_layers=1, num_decoder_layers=1, precision=precision)
    data = DataConfig(langs=("en", "de"), vocab_size=1000, vocab_sample_per_lang=2000,
                      src_len=32, tgt_len=32, max_eval_len=32)
    steps = TrainConfig(steps=steps, batch_size=8, warmup_steps=1, checkpoint_every=2,
                        log_every=1)
    return train(str(model_dir), model_cfg=model, mesh_cfg=MeshConfig(), data_cfg=data,
                 train_cfg=steps, progress=False)


def _saved(model_dir, name):
    return json.loads((model_dir / name).read_text())


@pytest.mark.slow
def test_train_prints_and_records_the_auto_choice_and_a_resume_keeps_it(tmp_path, capsys):
    from jaxmt import hardware
    from jaxmt.train.run import PRECISION_FILE

    auto = hardware.auto_precision()
    other = "fp32" if auto.policy == "bf16" else "bf16"  # both keep float32 parameters
    d = tmp_path / "model"
    _tiny_train(d, 2)
    assert f"precision: {auto.policy} ({auto.reason})\n" in capsys.readouterr().out
    assert _saved(d, "jaxmt_config.json")["model"]["precision"] == auto.policy  # concrete
    assert _saved(d, PRECISION_FILE) == {"requested": "auto", "precision": auto.policy,
                                         "reason": auto.reason, "device": "cpu"}

    # As if step 2 had been trained on a machine where auto picked the other policy.
    raw = _saved(d, "jaxmt_config.json")
    raw["model"]["precision"] = other
    (d / "jaxmt_config.json").write_text(json.dumps(raw))
    _tiny_train(d, 3)
    out = capsys.readouterr().out
    kept = (f"precision: {other} (kept from {d / 'jaxmt_config.json'}: the checkpoints were "
            f"trained with it; auto would pick {auto.policy} here: {auto.reason})\n")
    assert kept in out and "resuming from step 2" in out
    assert _saved(d, "jaxmt_config.json")["model"]["precision"] == other
    assert _saved(d, PRECISION_FILE)["precision"] == other
    assert _saved(d, PRECISION_FILE)["requested"] == "auto"


def test_resolve_precision_rules(tmp_path, monkeypatch):
    """Which policy a run gets, without training: explicit, fresh "auto", resumed "auto"."""
    from jaxmt import config as cfglib
    from jaxmt import hardware
    from jaxmt.train.run import resolve_precision

    monkeypatch.setattr(hardware, "auto_precision",
                        lambda: hardware.PrecisionChoice("fp32", "this CPU has no native bf16"))
    d = tmp_path / "m"
    d.mkdir()
    cfg = ModelConfig(**TINY)
    got, why = resolve_precision(str(d), cfg)
    assert (got.precision, why) == ("fp32", "this CPU has no native bf16")
    assert got == ModelConfig(**TINY, precision="fp32")
    assert resolve_precision(str(d), ModelConfig(precision="fp32"))[1] == (
        "set by ModelConfig.precision")
    assert resolve_precision(str(d), ModelConfig(precision="bf16_params"))[1] == (
        "set by ModelConfig.precision; auto would pick fp32 here: this CPU has no native bf16")

    # A stored concrete policy counts only where checkpoints were trained with it.
    (d / cfglib.CONFIG_FILE).write_text(cfglib.to_json(model=ModelConfig(**TINY,
                                                                         precision="bf16")))
    assert resolve_precision(str(d), cfg)[0].precision == "fp32"
    (d / "checkpoints").mkdir()
    got, why = resolve_precision(str(d), cfg)
    assert got.precision == "bf16" and why.startswith(f"kept from {d / cfglib.CONFIG_FILE}")
    assert resolve_precision(str(d), ModelConfig(**TINY, precision="fp32"))[0].precision == "fp32"
    (d / cfglib.CONFIG_FILE).write_text(cfglib.to_json(model=cfg))  # "auto" stored: decide again
    assert resolve_precision(str(d), cfg)[0].precision == "fp32"


# Two processes whose machines disagree: both must compile process 0's policy.
_TWO_HOSTS = """
import os, sys
pid, port, d = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
from jaxmt import hardware
from jaxmt.config import ModelConfig
from jaxmt.train.run import resolve_precision
mine = hardware.PrecisionChoice("bf16" if pid == 0 else "fp32", f"host {pid}")
hardware.auto_precision = lambda: mine
cfg, why = resolve_precision(os.path.join(d, str(pid)), ModelConfig())
print(f"{cfg.precision} | {why}")
"""


def test_hosts_that_disagree_take_process_0s_choice(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, str(i), port, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert outs[0][0].strip().splitlines()[-1] == "bf16 | host 0"
    assert outs[1][0].strip().splitlines()[-1] == (
        "bf16 | process 0's choice, so every process compiles the same program; auto would "
        "pick fp32 here: host 1")
