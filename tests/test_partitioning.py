"""Meshes over 8 fake devices, parameter shardings that follow the rule table, and a
sharded train step that runs unchanged on 1 and on 8 devices."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmt import axes
from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
from jaxmt.model import EncoderDecoderModel
from jaxmt.partitioning import Partitioner, resolve_mesh_shape
from jaxmt.trainer import Trainer

CFG = ModelConfig(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=1, num_decoder_layers=1, precision="fp32")


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 4 devices but 8"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)


def _spec_from_rules(names):
    """Expected mesh axes: the first rule for each name whose mesh axis is still free."""
    rules = dict(axes.RULES)
    used, out = set(), []
    for n in names:
        m = rules.get(n)
        ms = (m,) if isinstance(m, str) else (m or ())
        if m is None or used & set(ms):
            out.append(None)
        else:
            used |= set(ms)
            out.append(m)
    return P(*out)


def test_param_shardings_follow_rules():
    p = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2))
    tr = Trainer(CFG, TrainConfig(batch_size=8), p, 8, 8)
    with p.activate():
        boxed = jax.eval_shape(tr._init_boxed, jax.random.PRNGKey(0)).params
    state = tr.init_state(0)
    flat_boxed = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    flat_real = dict(jax.tree_util.tree_leaves_with_path(state.params))
    assert len(flat_boxed) == len(flat_real)
    for path, box in flat_boxed:
        arr = flat_real[path]
        assert arr.sharding.spec == _spec_from_rules(box.names), (path, box.names)
    emb = state.params["token_embed"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    # A (vocab, embed) table split 2 x 2 and replicated over data: each shard is 1/4.
    assert emb.addressable_shards[0].data.shape == (256 // 2, 32 // 2)


def _batch(b, length, seed=0):
    return EncoderDecoderModel(CFG).random_batch(b, length, length, seed)


def test_same_step_on_one_and_eight_devices():
    tc = TrainConfig(batch_size=8, learning_rate=1e-3, warmup_steps=1, steps=10)
    batch = _batch(8, 8)
    losses = []
    for mesh, devs in [(MeshConfig(), jax.devices()[:1]),
                       (MeshConfig(data=2, fsdp=2, tensor=2), None)]:
        p = Partitioner(mesh, devices=devs)
        tr = Trainer(CFG, tc, p, 8, 8)
        state = tr.init_state(0)
        step = tr.step_fn()
        out = []
        for _ in range(2):
            state, m = step(state, p.shard_batch(batch, 8), jax.random.PRNGKey(0))
            out.append(float(m["loss"]))
        losses.append(out)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_batch_not_divisible_is_a_clear_error():
    p = Partitioner(MeshConfig(data=4, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by data x fsdp = 8"):
        Trainer(CFG, TrainConfig(batch_size=12), p, 8, 8)
