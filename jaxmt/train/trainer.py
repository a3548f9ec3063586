"""Training: optimizer, sharded state, the jitted train step, and the loop.

This module imports no TensorFlow. The data pipeline (seqio) is imported only
inside :func:`train`, the gin entry point, so the train step can be used and tested
on its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from jaxmt.sharding import axes
from jaxmt import config as cfglib
from jaxmt.train import loss_scale as scaling
from jaxmt.checkpoint import Checkpointer, abstract_like
from jaxmt.config import DataConfig, MeshConfig, ModelConfig, TrainConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.sharding.partitioning import Partitioner

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and replaces.

    Attributes:
      step: batches consumed. It advances on every step, including one skipped for a
        float16 overflow, so it keeps matching the loop, checkpoints and data position.
        The optimizer's own count (inside ``opt_state``, which drives the learning-rate
        schedule) does not advance on a skipped step.
      params: the model parameters.
      opt_state: the optimizer state.
      loss_scale: the dynamic loss scale under the "fp16" policy, else None (no leaves,
        so other policies compile the same step as without it).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    loss_scale: scaling.LossScaleState | None = None


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up, then cosine decay to 10% of the peak at the last step."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=0.1 * cfg.learning_rate)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    sched = learning_rate_schedule(cfg)
    if cfg.optimizer == "adamw":
        # No decay on vectors (norm scales, bias tables are 2-D but tiny; keep T5X's habit).
        opt = optax.adamw(sched, b1=0.9, b2=0.98, eps=1e-9, weight_decay=cfg.weight_decay,
                          mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    else:
        # T5's recipe: updates relative to each parameter's scale, which suits T5's
        # unscaled attention (queries start at std (d_model * head_dim) ** -0.5).
        opt = optax.adafactor(sched, multiply_by_parameter_scale=True, clipping_threshold=1.0)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)


def _fix_unmatched_boxes(tree: PyTree) -> PyTree:
    """Optimizer leaves that inherited a parameter's axis names but not its shape
    (Adafactor's factored moments, and its (1,) placeholders for unfactored ones) are
    left unannotated, i.e. replicated: they are small."""
    def fix(x):
        if isinstance(x, nn.LogicallyPartitioned) and (
                len(x.names) != x.value.ndim or 1 in x.value.shape):
            return x.value
        return x
    return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


class Trainer:
    """Holds the model, optimizer and partitioner; builds and runs the sharded step."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, partitioner: Partitioner,
                 src_len: int, tgt_len: int):
        self.model = EncoderDecoderModel(model_cfg)
        self.cfg = train_cfg
        self.partitioner = partitioner
        self.tx = make_optimizer(train_cfg)
        self.schedule = learning_rate_schedule(train_cfg)
        partitioner.check_model(model_cfg)
        partitioner.check_batch(train_cfg.batch_size, train_cfg.num_microbatches)
        self._dummy = self.model.dummy_batch(1, src_len, tgt_len)
        with partitioner.activate():
            boxed = jax.eval_shape(self._init_boxed, jax.ShapeDtypeStruct((2,), jnp.uint32))
        self.state_shardings = partitioner.logical_shardings(boxed).replace(
            params=partitioner.logical_shardings(boxed.params, params=True))
        # Gradients are laid out like the optimizer state (which follows the parameters'
        # names under the full rules): under ZeRO-1 this reduce-scatters them.
        self.grad_shardings = partitioner.logical_shardings(boxed.params)
        if self.loss_scaling:
            self.state_shardings = self.state_shardings.replace(loss_scale=jax.tree.map(
                lambda _: partitioner.replicated, self.state_shardings.loss_scale))
        self.abstract_state = abstract_like(nn.unbox(boxed), self.state_shardings)
        self._init_fn = self._step_fn = self._scalars_fn = self._jitted = None

    @property
    def loss_scaling(self) -> bool:
        """Dynamic loss scaling is on for float16 compute only."""
        return self.model.cfg.precision == "fp16"

    def _init_boxed(self, rng: jax.Array) -> TrainState:
        params = self.model.init(rng, self._dummy)
        opt_state = _fix_unmatched_boxes(self.tx.init(params))
        ls = scaling.init_loss_scale(self.cfg.loss_scale_init) if self.loss_scaling else None
        return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=opt_state,
                          loss_scale=ls)

    def _scalars(self, step: int, scale: float | None, good_steps: int):
        """``(step, loss_scale)`` placed as the step expects them (replicated)."""
        if self._scalars_fn is None:
            def make(step, scale, good_steps):
                ls = scaling.init_loss_scale(scale, good_steps) if self.loss_scaling else None
                return step, ls
            # jit with out_shardings places them on every device, on one host or many.
            self._scalars_fn = jax.jit(make, out_shardings=(self.state_shardings.step,
                                                            self.state_shardings.loss_scale))
        scale = self.cfg.loss_scale_init if scale is None else scale
        return self._scalars_fn(np.int32(step), np.float32(scale), np.int32(good_steps))

    def loss_scale_state(self, scale: float | None = None, good_steps: int = 0
                         ) -> scaling.LossScaleState | None:
        """A replicated loss-scale state (``TrainConfig.loss_scale_init`` by default);
        None when the policy does not scale the loss."""
        return self._scalars(0, scale, good_steps)[1]

    def restore_state(self, ckpt: Checkpointer, step: int) -> tuple[TrainState, dict]:
        """The train state saved at ``step`` (see :func:`checkpoint_meta`), and its meta.

        A checkpoint without a loss scale (another policy, or older) starts from
        ``TrainConfig.loss_scale_init``.
        """
        params, opt_state, meta = ckpt.restore(step, self.abstract_state.params,
                                               self.abstract_state.opt_state)
        saved = meta.get("loss_scale")
        scale, good_steps = scaling.from_json(saved) if saved else (None, 0)
        step_arr, ls = self._scalars(step, scale, good_steps)
        return TrainState(step=step_arr, params=params, opt_state=opt_state, loss_scale=ls), meta

    def init_state(self, seed: int) -> TrainState:
        """Parameters and optimizer state created directly in their shards."""
        if self._init_fn is None:  # kept, so a second call does not compile again
            self._init_fn = jax.jit(lambda r: nn.unbox(self._init_boxed(r)),
                                    out_shardings=self.state_shardings)
        with self.partitioner.activate():
            return self._init_fn(jax.random.PRNGKey(seed))

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

    def _microbatches(self, batch: dict) -> dict:
        """``[B, L]`` arrays as ``[n, B / n, L]``: microbatch i takes rows i, i + n, ...,
        so every device keeps the same rows and the split moves no data."""
        n = self.cfg.num_microbatches
        spec = P(None, *self.partitioner.batch_spec)
        return {k: jax.lax.with_sharding_constraint(
                    v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1),
                    self.partitioner.sharding(spec)) for k, v in batch.items()}

    def loss_and_grads(self, state: TrainState, batch: dict, rng: jax.Array
                       ) -> tuple[jax.Array, dict, PyTree]:
        """Mean token loss of the whole batch, summed metrics, and its gradients.

        With ``TrainConfig.num_microbatches`` = n > 1 the batch runs as n microbatches in
        a ``lax.scan`` whose carry holds float32 gradient sums, so activations are those
        of one microbatch. Each data-parallel shard sums its own gradients and the shards
        are reduced once at the end, so the step all-reduces as much as without
        accumulation (over ``fsdp`` the sums stay sharded like the optimizer state).
        Each microbatch's summed loss is divided by the whole batch's token count, so the
        sum of their gradients is the gradient of the full batch's mean loss.
        Under the "fp16" policy the gradients are unscaled, and may be non-finite.
        """
        cfg = self.cfg
        dropout_rng = (jax.random.fold_in(rng, state.step)
                       if self.model.cfg.dropout_rate > 0 else None)
        ntok = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)

        def grads_of(mb, rng_mb):
            loss_fn = lambda p: self.model.loss(p, mb, dropout_rng=rng_mb,
                                                label_smoothing=cfg.label_smoothing,
                                                z_loss=cfg.z_loss, normalizer=ntok)
            if not self.loss_scaling:
                return jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            (loss, metrics), grads, _ = scaling.scaled_value_and_grad(
                loss_fn, state.params, state.loss_scale)
            return (loss, metrics), grads

        n = cfg.num_microbatches
        if n == 1:
            (loss, metrics), grads = grads_of(batch, dropout_rng)
            return loss, metrics, grads
        part = self.partitioner
        # Mesh axes over which parameters are replicated and only the batch is split.
        # Summing gradients over them inside the loop would all-reduce every microbatch;
        # instead each shard keeps its own sum (a leading [d] axis laid on these mesh
        # axes, computed by vmap) and they are added once, after the loop.
        local = tuple(a for a in ("replica", "data") if part.sizes[a] > 1)
        d = math.prod(part.sizes[a] for a in local)
        acc_shardings = jax.tree.map(lambda s: part.sharding(P(local or None, *s.spec)),
                                     self.grad_shardings)
        inner_rules = part.rules_without(local)
        inner_batch = nn.logical_to_mesh_axes((axes.ACT_BATCH, axes.ACT_LENGTH), inner_rules)

        def shard_grads(mb, rng_mb):
            mb = {k: jax.lax.with_sharding_constraint(
                      v.reshape(d, v.shape[0] // d, *v.shape[1:]),  # [d, rows / d, len]
                      part.sharding(P(local or None, *inner_batch))) for k, v in mb.items()}
            rngs = None if rng_mb is None else jax.random.split(rng_mb, d)
            with nn.logical_axis_rules(inner_rules):  # `local` axes belong to the vmap
                (loss, metrics), grads = jax.vmap(
                    grads_of, in_axes=(0, None if rngs is None else 0),
                    spmd_axis_name=local or None)(mb, rngs)
            sum0 = lambda tree: jax.tree.map(lambda x: jnp.sum(x, axis=0), tree)
            return (jnp.sum(loss), sum0(metrics)), grads  # grads [d, ...]

        def body(carry, xs):
            loss_acc, metrics_acc, grads_acc = carry
            mb, i = xs
            rng_i = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            (loss, metrics), grads = shard_grads(mb, rng_i)
            grads_acc = jax.lax.with_sharding_constraint(jax.tree.map(
                lambda a, g: a + g.astype(jnp.float32), grads_acc, grads), acc_shardings)
            return (loss_acc + loss, jax.tree.map(jnp.add, metrics_acc, metrics), grads_acc), None

        micro = self._microbatches(batch)
        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: shard_grads(first, dropout_rng)[0][1])
        init = (jnp.zeros((), jnp.float32),
                jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), metric_shapes),
                jax.lax.with_sharding_constraint(jax.tree.map(
                    lambda x: jnp.zeros((d,) + x.shape, jnp.float32), state.params),
                    acc_shardings))
        (loss, metrics, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(n)))
        # One reduction over the shards; back to each parameter's dtype, so the
        # optimizer state keeps its dtypes.
        grads = jax.tree.map(lambda g, p: jnp.sum(g, axis=0).astype(p.dtype), grads, state.params)
        return loss, metrics, grads

    def _train_step(self, state: TrainState, batch: dict, rng: jax.Array):
        loss, metrics, grads = self.loss_and_grads(state, batch, rng)
        grads = jax.lax.with_sharding_constraint(grads, self.grad_shardings)
        if self.loss_scaling:
            finite = scaling.all_finite(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=self.schedule(state.step),
                       source_tokens=jnp.sum(batch["encoder_input_tokens"] > 0))
        loss_scale = None
        if self.loss_scaling:
            # An overflowed step keeps the old parameters and optimizer state: a leaf-wise
            # select (Flax's DynamicScale recipe), so the step has no data-dependent
            # control flow; the update is computed either way.
            params = scaling.select_tree(finite, params, state.params)
            opt_state = scaling.select_tree(finite, opt_state, state.opt_state)
            loss_scale = scaling.update_loss_scale(state.loss_scale, finite,
                                                     self.cfg.loss_scale_growth_interval)
            metrics = dict(metrics, loss_scale=loss_scale.scale,
                           skipped=1 - finite.astype(jnp.int32))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          loss_scale=loss_scale), metrics

    def _jitted_step(self):
        p = self.partitioner
        return jax.jit(self._train_step,
                       in_shardings=(self.state_shardings, p.batch_sharding, p.replicated),
                       out_shardings=(self.state_shardings, p.replicated), donate_argnums=(0,))

    def compile_step(self, src_len: int, tgt_len: int):
        """The step compiled ahead of time for a global batch of ``TrainConfig.batch_size``
        rows, without data or initialised state: ``.memory_analysis()`` and
        ``.cost_analysis()`` tell what a configuration needs per device before a run."""
        p = self.partitioner
        batch = {k: jax.ShapeDtypeStruct((self.cfg.batch_size, src_len if k.startswith("encoder")
                                          else tgt_len), jnp.int32, sharding=p.batch_sharding)
                 for k in self._dummy}
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=p.replicated)
        with p.activate():
            return self._jitted_step().lower(self.abstract_state, batch, rng).compile()

    def step_fn(self) -> Callable:
        """The jitted step with explicit in/out shardings; the old state is donated."""
        if self._step_fn is None:
            p = self.partitioner
            self._jitted = jitted = self._jitted_step()  # kept: compiled_shapes() asks it

            def run(state, batch, rng):
                with p.activate():
                    return jitted(state, batch, rng)
            self._step_fn = run
        return self._step_fn

    def compiled_shapes(self) -> int:
        """How many times :meth:`step_fn`'s step has been compiled: one per batch shape
        it has seen (bucketed batching has several), 0 before the first step."""
        return 0 if self._jitted is None else int(self._jitted._cache_size())


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class MetricWriter:
    """TensorBoard event files under ``model_dir/train`` (process 0 only)."""

    def __init__(self, model_dir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(os.path.join(model_dir, "train"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def checkpoint_meta(state: TrainState, meta: dict | None, step: int) -> dict:
    """The JSON item of a checkpoint: ``meta``, the step, and the loss scale if any."""
    out = dict(meta or {}, step=step)
    if state.loss_scale is not None:
        out["loss_scale"] = scaling.to_json(state.loss_scale)
    return out


def train_loop(trainer: Trainer, batches: Iterator[dict[str, np.ndarray]], model_dir: str,
               ckpt: Checkpointer, state: TrainState, start_step: int,
               meta: dict | None = None, progress: bool = True,
               data_position: dict | None = None) -> tuple[TrainState, dict]:
    """Runs from ``start_step`` to ``trainer.cfg.steps``; returns final state and metrics.

    ``data_position`` is the position of ``batches`` at ``start_step`` (a
    :func:`jaxmt.data.pipeline.position_record`). Every checkpoint then stores it as
    ``meta["data"]``, advanced by the batches taken since (one per step), so a resumed
    run restarts the stream where this one stopped.
    """
    from tqdm import tqdm

    cfg = trainer.cfg
    step_fn = trainer.step_fn()
    rng = jax.random.PRNGKey(cfg.seed + 1)
    writer = MetricWriter(model_dir)
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step",
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    last = {}
    t0, tok_acc, steps_acc = time.perf_counter(), 0, 0
    src_slots = tgt_slots = 0  # token slots of the steps since the last log (for fill)
    skipped_total = 0  # float16 overflow skips in this run
    pending = []
    for step in range(start_step, cfg.steps):
        local = next(batches)
        # Bucketed batches change shape from step to step: the global rows are this
        # host's times the process count (every host gets the same shape each step).
        rows = local["encoder_input_tokens"].shape[0] * jax.process_count()
        batch = trainer.partitioner.shard_batch(local, rows)
        # Token slots of each step's global batch, for the non-padding share (fill).
        src_slots += int(np.prod(batch["encoder_input_tokens"].shape))
        tgt_slots += int(np.prod(batch["decoder_target_tokens"].shape))
        state, metrics = step_fn(state, batch, rng)
        if pending:  # keep one step in flight, so the bar's steps/s and ETA are real
            jax.block_until_ready(pending[-1]["loss"])
        pending.append(metrics)
        bar.update(1)
        steps_acc += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            host = [jax.device_get(m) for m in pending]  # one sync per log interval
            pending = []
            dt = time.perf_counter() - t0
            tok_acc = sum(float(m["tokens"]) + float(m["source_tokens"]) for m in host)
            ntok = sum(float(m["tokens"]) for m in host)
            last = {"loss": sum(float(m["loss_sum"]) for m in host) / max(ntok, 1.0),
                    "nll": sum(float(m["nll_sum"]) for m in host) / max(ntok, 1.0),
                    "accuracy": sum(float(m["correct"]) for m in host) / max(ntok, 1.0),
                    "grad_norm": float(host[-1]["grad_norm"]),
                    "learning_rate": float(host[-1]["learning_rate"]),
                    "tokens_per_s": tok_acc / dt, "steps_per_s": steps_acc / dt,
                    # Share of non-padding tokens: source tokens, loss-weighted targets.
                    "src_fill": sum(float(m["source_tokens"]) for m in host)
                    / max(src_slots, 1),
                    "tgt_fill": ntok / max(tgt_slots, 1),
                    # Batch shapes compiled so far (one with packing; <= buckets).
                    "compiled_shapes": trainer.compiled_shapes()}
            src_slots = tgt_slots = 0
            postfix = dict(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                           lr=f"{last['learning_rate']:.2e}",
                           fill=f"{last['src_fill']:.2f}/{last['tgt_fill']:.2f}")
            if trainer.loss_scaling:
                skipped = sum(int(m["skipped"]) for m in host)
                skipped_total += skipped
                last["loss_scale"] = float(host[-1]["loss_scale"])
                last["skipped_steps"] = skipped  # in this log interval
                postfix.update(scale=f"{last['loss_scale']:g}", skipped=skipped_total)
            writer.scalars(done, last)
            bar.set_postfix(**postfix)
            t0, steps_acc = time.perf_counter(), 0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            step_meta = meta
            if data_position is not None:
                step_meta = dict(meta or {}, data=dict(
                    data_position, batches=data_position["batches"] + done - start_step))
            ckpt.save(done, state.params, state.opt_state, checkpoint_meta(state, step_meta, done))
    bar.close()
    ckpt.wait()
    writer.close()
    return state, last


@gin.configurable
def train(model_dir: str, progress: bool = True) -> dict:
    """The ``jaxmt train`` entry point: vocabulary, data, sharded state, loop, checkpoints.

    Rerunning on the same ``model_dir`` resumes from the latest checkpoint.
    Returns the last logged metrics.
    """
    from jaxmt.data import cache, pipeline, tasks, vocab  # seqio/TF only from here on

    model_cfg, mesh_cfg, data_cfg, train_cfg = ModelConfig(), MeshConfig(), DataConfig(), TrainConfig()
    os.makedirs(model_dir, exist_ok=True)
    # Files in the model directory come from process 0 only; the others wait for them.
    lead = jax.process_index() == 0
    spm_path = os.path.join(model_dir, cfglib.VOCAB_FILE)
    if lead:
        _write_text_atomic(os.path.join(model_dir, cfglib.CONFIG_FILE), cfglib.to_json(
            model=model_cfg, mesh=mesh_cfg, data=data_cfg, train=train_cfg))
        _write_text_atomic(os.path.join(model_dir, "config.gin"), gin.operative_config_str())
        if not os.path.exists(spm_path):
            print(f"training SentencePiece vocabulary ({data_cfg.vocab_size} pieces) -> "
                  f"{spm_path}", flush=True)
            vocab.train_for_config(spm_path, data_cfg, train_cfg.seed)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxmt:vocabulary")
    n_pieces = vocab.load_processor(spm_path).get_piece_size()
    if n_pieces > model_cfg.vocab_size:
        raise ValueError(f"{spm_path}: {n_pieces} pieces exceed ModelConfig.vocab_size="
                         f"{model_cfg.vocab_size}; raise it or lower DataConfig.vocab_size.")
    # The user's files are read and checked once, here (jaxmt/data/sources.py).
    mixture = tasks.register_from_config(data_cfg, spm_path, report_dir=model_dir if lead else None)
    cache_dir = data_cfg.cache_dir or os.path.join(model_dir, cfglib.CACHE_DIR)
    use_cache = cache.activate(cache_dir, mixture, spm_path)  # stale -> error, absent -> False
    print(f"data: reading the pre-tokenised cache in {cache_dir}" if use_cache else
          f"data: tokenising on the fly (`jaxmt data cache` writes a cache to {cache_dir})",
          flush=True)
    # Nothing is dropped without a count; the two directions of a pair share a report.
    train_reports = [r["train"] for r in tasks.SKIP_REPORTS.values() if "train" in r]
    for report in {id(r): r for r in train_reports}.values():
        print(f"data {report.summary()}", flush=True)

    partitioner = Partitioner(mesh_cfg)
    trainer = Trainer(model_cfg, train_cfg, partitioner, data_cfg.src_len, data_cfg.tgt_len)
    local_shapes, bucket_stats = (), None
    if data_cfg.batching == "bucket":
        from jaxmt.data import bucketing
        # Every shape's rows split over the batch mesh axes and microbatches, and over
        # the processes (each feeds rows // process_count of every batch).
        multiple = math.lcm(partitioner.data_parallel_size * train_cfg.num_microbatches,
                            jax.process_count())
        shapes = bucketing.bucket_shapes(data_cfg.bucket_lengths, train_cfg.batch_size,
                                         max(data_cfg.src_len, data_cfg.tgt_len), multiple)
        for rows, _ in shapes:
            partitioner.check_batch(rows, train_cfg.num_microbatches)
        local_shapes = [(rows // jax.process_count(), n) for rows, n in shapes]
        bucket_stats = bucketing.BucketStats()
        print(f"bucketing: {len(shapes)} shapes (rows x length): "
              f"{', '.join(f'{r}x{n}' for r, n in shapes)}; at most {len(shapes)} "
              f"compilations", flush=True)
    ckpt = Checkpointer(model_dir, keep=train_cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state, saved_meta = trainer.restore_state(ckpt, start)
        print(f"resuming from step {start} in {ckpt.directory}", flush=True)
        # The saved data position (or, for an older checkpoint, a warning and a reseed).
        position = pipeline.resume_position(saved_meta, seed=train_cfg.seed, step=start,
                                            process_count=jax.process_count(),
                                            cached=use_cache)
    else:
        state = trainer.init_state(train_cfg.seed)
        position = pipeline.position_record(train_cfg.seed, 0, jax.process_count(), use_cache)
    print(f"model: {trainer.num_params() / 1e6:.2f}M parameters; {partitioner} over "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) in "
          f"{jax.process_count()} process(es)", flush=True)
    if start >= train_cfg.steps:
        ckpt.close()
        print(f"already trained to step {start} (TrainConfig.steps={train_cfg.steps})")
        return {}
    # The stream depends only on (seed, process index, process count); a resumed run
    # skips the batches it had consumed, so it sees what an uninterrupted run would.
    if position["batches"]:
        print(f"data: skipping {position['batches']} batches to the saved position",
              flush=True)
    batches = pipeline.train_batches(
        mixture, data_cfg.src_len, data_cfg.tgt_len,
        partitioner.host_local_batch_size(train_cfg.batch_size), seed=position["seed"],
        shard_index=jax.process_index(), num_shards=jax.process_count(),
        batching=data_cfg.batching, buckets=local_shapes, bucket_stats=bucket_stats,
        start_batch=position["batches"], cache_dir=cache_dir if use_cache else None)
    try:
        _, last = train_loop(trainer, batches, model_dir, ckpt, state, start,
                             progress=progress, data_position=position)
    finally:  # on a crash or Ctrl-C too: let an in-flight async save finish
        ckpt.close()
    if bucket_stats is not None:
        print(f"bucketing: compiled {trainer.compiled_shapes()} train-step shape(s) (at most "
              f"{len(local_shapes)}); batches per bucket {bucket_stats.steps}; at most "
              f"{bucket_stats.peak_queued} examples queued on this host", flush=True)
    else:
        print(f"compiled {trainer.compiled_shapes()} train-step shape(s)", flush=True)
    if lead:
        # Rewrite after the run: gin's operative config lists every binding actually used.
        _write_text_atomic(os.path.join(model_dir, "config.gin"), gin.operative_config_str())
        _write_text_atomic(os.path.join(model_dir, "train_summary.json"),
                           json.dumps(dict(last, steps=train_cfg.steps), indent=2))
    return last
