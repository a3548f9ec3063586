"""``TrainConfig.max_minutes``: the learning rate follows the wall-clock budget, and the
run stops when it is spent, with a checkpoint that a rerun resumes from."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxmt.checkpoint import Checkpointer
from jaxmt.config import MeshConfig, ModelConfig, TrainConfig
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.loop import train_loop
from jaxmt.train.trainer import Trainer, learning_rate, make_optimizer

TINY = dict(vocab_size=320, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
            num_encoder_layers=1, num_decoder_layers=1, precision="fp32")


@pytest.mark.parametrize("warmup,horizon", [(10, 100), (0, 50), (30, 20)])
def test_learning_rate_is_optax_warmup_cosine_over_the_horizon(warmup, horizon):
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=warmup, steps=10_000)
    w = min(warmup, horizon - 1)
    ref = optax.warmup_cosine_decay_schedule(0.0, 3e-3, w, horizon, end_value=3e-4)
    for step in [0, 1, w // 2, w, w + 1, (w + horizon) // 2, horizon - 1, horizon, 2 * horizon]:
        np.testing.assert_allclose(learning_rate(cfg, step, horizon), ref(step),
                                   rtol=1e-5, atol=1e-9, err_msg=f"step {step}")


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_unit_optimizer_times_learning_rate_is_the_scheduled_optimizer(optimizer):
    """The step scales a unit-rate update by the rate: the same update as optax with
    the schedule inside (both optimizers end in a linear scale)."""
    cfg = TrainConfig(optimizer=optimizer, learning_rate=1e-2, warmup_steps=2, steps=6)
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6, end_value=1e-3)
    ref = (optax.adamw(sched, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01,
                       mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
           if optimizer == "adamw" else
           optax.adafactor(sched, multiply_by_parameter_scale=True, clipping_threshold=1.0))
    ref = optax.chain(optax.clip_by_global_norm(1.0), ref)
    ours = make_optimizer(cfg)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(8, 4)).astype(np.float32),
              "b": rng.normal(size=(4,)).astype(np.float32)}
    s_ref, s_ours = ref.init(params), ours.init(params)
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_ours)  # checkpoints still fit
    for step in range(5):
        g = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        u_ref, s_ref = ref.update(g, s_ref, params)
        u, s_ours = ours.update(g, s_ours, params)
        lr = learning_rate(cfg, step, cfg.steps)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a * lr, b, rtol=2e-6, atol=1e-10),
                     u, u_ref)


def _batches(tr: Trainer, rows: int, length: int):
    step = 0
    while True:
        yield tr.model.random_batch(rows, length, length, seed=step % 16)
        step += 1


@pytest.mark.slow
def test_budget_stops_with_a_checkpoint_and_the_rate_decays_to_its_end(tmp_path):
    cfg = TrainConfig(steps=1_000_000, max_minutes=0.06, batch_size=4, warmup_steps=5,
                      learning_rate=1e-2, log_every=10, checkpoint_every=100_000)
    tr = Trainer(ModelConfig(**TINY), cfg, Partitioner(MeshConfig(), devices=jax.devices()[:1]),
                 8, 8)
    # Compile first, so the 3.6 s go to steps even on a busy machine (the budget counts
    # the compile, as wall-clock time should).
    tr.step_fn()(tr.init_state(0), tr.partitioner.shard_batch(next(_batches(tr, 4, 8)), 4),
                 jax.random.PRNGKey(0))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    state, last = train_loop(tr, _batches(tr, 4, 8), str(tmp_path), ckpt, tr.init_state(0), 0,
                             progress=False, data_position={"seed": 0, "batches": 0})
    stop = last["budget_spent_at"]
    assert stop > 20 and ckpt.latest_step() == stop == int(state.step)
    assert 3.6 <= 60 * last["train_minutes"] < 3.6 + 5.0  # stops once spent (+ a step, a save)
    # The horizon converged on the stop, so the rate ended decayed, not cut off mid-way.
    assert abs(last["lr_horizon"] - stop) <= 0.25 * stop, (last["lr_horizon"], stop)
    assert last["learning_rate"] < 0.35 * cfg.learning_rate, last
    # A resumed run keeps the spent time and the horizon.
    _, _, meta = ckpt.restore(stop, tr.abstract_state.params, tr.abstract_state.opt_state)
    assert meta["train_seconds"] >= 3.6 and meta["lr_horizon"] == last["lr_horizon"]
    assert meta["data"]["batches"] == stop  # beside the data position, as train() saves it
    restored, _ = tr.restore_state(ckpt, stop)
    assert int(restored.lr_horizon) == meta["lr_horizon"]
    ckpt.close()


def test_without_a_budget_the_horizon_is_steps_even_on_resume(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1, log_every=2, checkpoint_every=2)
    tr = Trainer(ModelConfig(**TINY), cfg, Partitioner(MeshConfig(), devices=jax.devices()[:1]),
                 8, 8)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    state, last = train_loop(tr, _batches(tr, 4, 8), str(tmp_path), ckpt, tr.init_state(0), 0,
                             progress=False)
    assert "budget_spent_at" not in last and int(state.step) == 4
    np.testing.assert_allclose(last["learning_rate"], learning_rate(cfg, 3, 4), rtol=1e-6)
    longer = Trainer(ModelConfig(**TINY), TrainConfig(steps=9, batch_size=4),
                     Partitioner(MeshConfig(), devices=jax.devices()[:1]), 8, 8)
    assert int(longer.restore_state(ckpt, 4)[0].lr_horizon) == 9
    ckpt.close()
