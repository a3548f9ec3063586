"""The train state, the optimizer and the sharded train step (no TensorFlow, no data).

:class:`Trainer` builds the state's shardings from the model's logical axes and
compiles the step through its :class:`~jaxmt.sharding.partitioning.Partitioner`;
:mod:`jaxmt.train.loop` runs it and :mod:`jaxmt.train.run` is the gin entry point.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxmt import hardware
from jaxmt.checkpoint import Checkpointer, abstract_like
from jaxmt.compress import prune
from jaxmt.config import ModelConfig, TrainConfig
from jaxmt.data.packing import LANG_KEYS
from jaxmt.modeling import param_tree
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.sharding import axes
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train import loss_scale as scaling

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and replaces.

    Attributes:
      step: batches consumed. It advances on every step, including one skipped for a
        non-finite loss or gradients (e.g. a float16 overflow), so it keeps matching the
        loop, checkpoints and data position, and it drives the learning rate.
      params: the model parameters.
      opt_state: the optimizer state.
      loss_scale: the dynamic loss scale under the "fp16" policy, else None (no leaves,
        so other policies compile the same step as without it).
      lr_horizon: the step at which the learning rate has decayed to its end:
        ``TrainConfig.steps``, or the step the wall-clock budget
        (``TrainConfig.max_minutes``) is expected to stop at, re-estimated by the loop as
        the run goes (:func:`learning_rate`). A value, not a constant of the compiled
        step, so a new estimate costs no compile.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    loss_scale: scaling.LossScaleState | None = None
    lr_horizon: jax.Array | None = None


def learning_rate(cfg: TrainConfig, step: jax.Array, horizon: jax.Array) -> jax.Array:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 10% of the peak at
    step ``horizon`` (and flat after it); the same curve as optax's
    ``warmup_cosine_decay_schedule`` with ``decay_steps=horizon``, but ``horizon`` may
    be a traced value."""
    step = jnp.asarray(step, jnp.float32)
    horizon = jnp.maximum(jnp.asarray(horizon, jnp.float32), 2.0)
    peak, end = cfg.learning_rate, 0.1 * cfg.learning_rate
    warmup = jnp.minimum(float(cfg.warmup_steps), horizon - 1.0)
    frac = jnp.clip((step - warmup) / jnp.maximum(horizon - warmup, 1.0), 0.0, 1.0)
    decay = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, peak * step / jnp.maximum(warmup, 1.0), decay)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """:func:`learning_rate` over ``TrainConfig.steps``, as a function of the step."""
    return lambda step: learning_rate(cfg, step, cfg.steps)


def make_optimizer(cfg: TrainConfig, trainable: set[str] | None = None
                   ) -> optax.GradientTransformation:
    """Clipping, then Adafactor or AdamW with a unit learning rate: the train step
    multiplies the update by :func:`learning_rate` (both optimizers end in a linear
    scale, so this is the same update). A schedule callable, not the constant 1.0, keeps
    the optimizer state's structure (its step count) as checkpoints have it.

    With ``trainable`` (parameter paths, :mod:`jaxmt.modeling.param_tree`), the others are
    frozen through ``optax.multi_transform``: their branch is ``set_to_zero``, which
    keeps no state, so frozen parameters cost no optimizer memory; clipping is inside
    the trainable branch (the global norm is that of the trained parameters).

    With ``TrainConfig.prune.sparsity`` > 0, gradual magnitude pruning of the trained
    targets comes last (:func:`jaxmt.compress.prune.magnitude_pruning`; the state is then
    ``(optimizer state, PruneState)``): it keeps the masks, and the step zeroes the pruned
    weights after the update (:func:`jaxmt.compress.prune.apply_masks`), so the learning
    rate's place does not matter.
    """
    opt = _optimizer(cfg)
    if trainable is not None:
        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda p, _: "train" if param_tree.path_str(p) in trainable else "freeze",
                params)
        opt = optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, labels)
    if cfg.prune.sparsity:
        opt = optax.chain(opt, prune.magnitude_pruning(cfg.prune, cfg.steps, among=trainable))
    return opt


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    unit = optax.constant_schedule(1.0)
    if cfg.optimizer == "adamw":
        # No decay on vectors (norm scales, bias tables are 2-D but tiny; keep T5X's habit).
        opt = optax.adamw(unit, b1=0.9, b2=0.98, eps=1e-9, weight_decay=cfg.weight_decay,
                          mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    else:
        # T5's recipe: updates relative to each parameter's scale, which suits T5's
        # unscaled attention (queries start at std (d_model * head_dim) ** -0.5).
        opt = optax.adafactor(unit, multiply_by_parameter_scale=True, clipping_threshold=1.0)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)


def _fix_unmatched_boxes(tree: PyTree) -> PyTree:
    """Optimizer leaves that inherited a parameter's axis names but not its shape
    (Adafactor's factored moments, and its (1,) placeholders for unfactored ones) are
    left unannotated, i.e. replicated: they are small."""
    def fix(x):
        if isinstance(x, nn.LogicallyPartitioned) and (
                not hasattr(x.value, "ndim")  # a frozen parameter's optax.MaskedNode
                or len(x.names) != x.value.ndim or 1 in x.value.shape):
            return x.value
        return x
    return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


class Trainer:
    """Holds the model, optimizer and partitioner; builds and runs the sharded step.

    With ``teacher_cfg`` (token-level distillation, ``TrainConfig.distill``), a frozen
    teacher of that architecture runs in the same step on the same batches: its
    parameters are sharded by the same rules as the student's, passed to the jitted
    step as their own argument (never in the :class:`TrainState`: not saved, not
    updated, no optimizer state) and set as :attr:`teacher_params` (:meth:`place_teacher`)
    before :meth:`step_fn` runs. :attr:`kd_ids` says which output ids the two compare
    (:meth:`jaxmt.compress.distill.Alignment.kd_ids`; default every one, for equal
    vocabulary sizes).
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, partitioner: Partitioner,
                 src_len: int, tgt_len: int, teacher_cfg: ModelConfig | None = None):
        if model_cfg.precision == "auto":  # the mesh's devices decide (an AOT TPU target too)
            choice = hardware.device_precision(partitioner.mesh.devices.flat[0])
            model_cfg = dataclasses.replace(model_cfg, precision=choice.policy)
        self.model = EncoderDecoderModel(model_cfg)
        self.cfg = train_cfg
        self.partitioner = partitioner
        self.schedule = learning_rate_schedule(train_cfg)
        partitioner.check_model(model_cfg)
        partitioner.check_batch(train_cfg.batch_size, train_cfg.num_microbatches)
        self._dummy = self.model.dummy_batch(1, src_len, tgt_len)
        self._init_teacher(teacher_cfg, src_len, tgt_len)
        all_paths = param_tree.paths(self.model.param_shapes())
        self.trainable = param_tree.trainable_paths(all_paths, train_cfg, model_cfg)
        self.frozen = all_paths - self.trainable
        self.tx = make_optimizer(train_cfg, self.trainable if self.frozen else None)
        # Set by the run when the base's parameters are not saved (adapters/LoRA over a
        # frozen base): checkpoints hold the trained parameters only, and a restore puts
        # them over ``base_params``.
        self.save_trained_only = False
        self.base_params: PyTree | None = None
        boxed = partitioner.eval_shape(self._init_boxed, jax.ShapeDtypeStruct((2,), jnp.uint32))
        self.state_shardings = partitioner.logical_shardings(boxed).replace(
            params=partitioner.logical_shardings(boxed.params, params=True))
        # Gradients are laid out like the optimizer state (which follows the parameters'
        # names under the full rules): under ZeRO-1 this reduce-scatters them.
        self.grad_shardings = self.trained(partitioner.logical_shardings(boxed.params))
        if self.loss_scaling:
            self.state_shardings = self.state_shardings.replace(loss_scale=jax.tree.map(
                lambda _: partitioner.replicated, self.state_shardings.loss_scale))
        self.abstract_state = abstract_like(nn.unbox(boxed), self.state_shardings)
        # The state's logical axis names (PartitionSpecs of names), for the planner's
        # per-device arithmetic on meshes that are not built (jaxmt/plan/memory.py).
        self.logical_specs = nn.get_partition_spec(boxed)
        self._init_fn = self._step_fn = self._scalars_fn = self._finite_fn = None

    def _init_teacher(self, teacher_cfg: ModelConfig | None, src_len: int, tgt_len: int):
        """The teacher's model, parameter placement and the distillation settings."""
        self.teacher: EncoderDecoderModel | None = None
        self.teacher_shardings = self.teacher_abstract = self.teacher_params = None
        self.kd_ids: int | tuple[np.ndarray, np.ndarray] | None = None
        # [vocab] bools: the targets a mapped vocabulary distils (for kd_covered); or None.
        self.kd_targets: np.ndarray | None = None
        if teacher_cfg is None:
            return
        if teacher_cfg.precision == "auto":
            choice = hardware.device_precision(self.partitioner.mesh.devices.flat[0])
            teacher_cfg = dataclasses.replace(teacher_cfg, precision=choice.policy)
        self.partitioner.check_model(teacher_cfg)
        self.teacher = EncoderDecoderModel(teacher_cfg)
        teacher_batch = self.teacher.dummy_batch(1, src_len, tgt_len)
        # The batches carry the teacher's routing ids too (the student ignores them).
        self._dummy.update({k: v for k, v in teacher_batch.items() if k in LANG_KEYS})
        # Placed like the student's parameters: logical axes from the boxed init.
        boxed = self.partitioner.eval_shape(
            lambda: self.teacher.init(jax.random.PRNGKey(0), teacher_batch))
        self.teacher_shardings = self.partitioner.logical_shardings(boxed, params=True)
        self.teacher_abstract = abstract_like(nn.unbox(boxed), self.teacher_shardings)

    def place_teacher(self, params: PyTree) -> None:
        """Sets :attr:`teacher_params`, placed in the teacher's shards (a no-op for
        parameters restored there)."""
        self.teacher_params = jax.device_put(params, self.teacher_shardings)

    def teacher_num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.teacher_abstract))

    def trained(self, tree: PyTree) -> PyTree:
        """The part of a parameter-shaped tree that trains (all of it when nothing is
        frozen)."""
        return param_tree.subset(tree, self.trainable) if self.frozen else tree

    def checkpoint_params(self, params: PyTree) -> PyTree:
        """What a checkpoint stores of ``params``: the trained part over a base
        (:attr:`base_params`), else everything."""
        return self.trained(params) if self.save_trained_only else params

    def optimizer_bytes(self, frozen: bool = True) -> int:
        """Bytes of optimizer state (all devices together); ``frozen=False``: what it
        would be if every parameter trained (full fine-tuning)."""
        state = self.abstract_state.opt_state if frozen else jax.eval_shape(
            _optimizer(self.cfg).init, self.abstract_state.params)
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))

    @property
    def loss_scaling(self) -> bool:
        """Dynamic loss scaling is on for float16 compute only."""
        return self.model.cfg.precision == "fp16"

    def _init_boxed(self, rng: jax.Array) -> TrainState:
        params = self.model.init(rng, self._dummy)
        opt_state = _fix_unmatched_boxes(self.tx.init(params))
        ls = scaling.init_loss_scale(self.cfg.loss_scale_init) if self.loss_scaling else None
        return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=opt_state,
                          loss_scale=ls, lr_horizon=jnp.array(self.cfg.steps, jnp.int32))

    def _scalars(self, step: int, scale: float | None, good_steps: int,
                 horizon: int | None = None):
        """``(step, loss_scale, lr_horizon)`` placed as the step expects them (replicated)."""
        if self._scalars_fn is None:
            def make(step, scale, good_steps, horizon):
                ls = scaling.init_loss_scale(scale, good_steps) if self.loss_scaling else None
                return step, ls, horizon
            # jit with out_shardings places them on every device, on one host or many.
            s = self.state_shardings
            self._scalars_fn = self.partitioner.jit(
                make, out_shardings=(s.step, s.loss_scale, s.lr_horizon))
        scale = self.cfg.loss_scale_init if scale is None else scale
        horizon = self.cfg.steps if horizon is None else horizon
        return self._scalars_fn(np.int32(step), np.float32(scale), np.int32(good_steps),
                                np.int32(horizon))

    def with_lr_horizon(self, state: TrainState, horizon: int) -> TrainState:
        """``state`` with the learning rate decaying to its end at step ``horizon``."""
        return state.replace(lr_horizon=self._scalars(0, None, 0, horizon)[2])

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
        params, opt_state, meta = ckpt.restore(
            step, self.checkpoint_params(self.abstract_state.params),
            self.abstract_state.opt_state)
        if self.save_trained_only:  # the trained part, over the frozen base
            params = param_tree.assemble(self.abstract_state.params, self.base_params, params)
        saved = meta.get("loss_scale")
        scale, good_steps = scaling.from_json(saved) if saved else (None, 0)
        # A budgeted run resumes with its horizon; otherwise TrainConfig.steps (which a
        # resumed run may have changed) decides it.
        saved_horizon = meta.get("lr_horizon") if self.cfg.max_minutes else None
        horizon = min(saved_horizon or self.cfg.steps, self.cfg.steps)
        step_arr, ls, horizon = self._scalars(step, scale, good_steps, horizon)
        return TrainState(step=step_arr, params=params, opt_state=opt_state, loss_scale=ls,
                          lr_horizon=horizon), meta

    def init_state(self, seed: int) -> TrainState:
        """Parameters and optimizer state created directly in their shards."""
        if self._init_fn is None:  # kept, so a second call does not compile again
            self._init_fn = self.partitioner.jit(lambda r: nn.unbox(self._init_boxed(r)),
                                                 out_shardings=self.state_shardings)
        return self._init_fn(jax.random.PRNGKey(seed))

    def params_finite(self, params: PyTree) -> bool:
        """Whether every parameter is finite (checked before each checkpoint is written)."""
        if self._finite_fn is None:
            self._finite_fn = self.partitioner.jit(scaling.all_finite,
                                                   out_shardings=self.partitioner.replicated)
        return bool(self._finite_fn(params))

    def num_params(self, trained_only: bool = False) -> int:
        params = self.abstract_state.params
        params = self.trained(params) if trained_only else params
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def _microbatches(self, batch: dict) -> dict:
        """``[B, L]`` arrays as ``[n, B / n, L]``: microbatch i takes rows i, i + n, ...,
        so every device keeps the same rows and the split moves no data."""
        n = self.cfg.num_microbatches
        spec = P(None, *self.partitioner.batch_spec)
        return {k: jax.lax.with_sharding_constraint(
                    v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1),
                    self.partitioner.sharding(spec)) for k, v in batch.items()}

    def loss_and_grads(self, state: TrainState, batch: dict, rng: jax.Array,
                       teacher_params: PyTree | None = None) -> tuple[jax.Array, dict, PyTree]:
        """Mean token loss of the whole batch, summed metrics, and its gradients.

        With a teacher, each microbatch's teacher logits come from a deterministic pass
        of ``teacher_params`` under ``stop_gradient``, beside the student's, and the
        loss is the distillation loss (:meth:`EncoderDecoderModel.loss`).

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

        # Gradients of the trained parameters only: frozen ones get none computed.
        trained = self.trained(state.params)

        kd = {}
        if self.teacher is not None:
            if teacher_params is None:
                raise ValueError("Trainer has a teacher: pass its parameters")
            kd = dict(alpha=cfg.distill.alpha, temperature=cfg.distill.temperature,
                      kd_ids=self.kd_ids, kd_targets=self.kd_targets)

        def grads_of(mb, rng_mb):
            # The teacher: frozen and deterministic (no dropout, no gradient).
            teacher = dict(kd, teacher_logits=jax.lax.stop_gradient(
                self.teacher.logits(teacher_params, mb))) if kd else {}
            loss_fn = lambda p: self.model.loss(  # noqa: E731
                param_tree.overlay(state.params, p) if self.frozen else p, mb,
                dropout_rng=rng_mb, label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                normalizer=ntok, **teacher)
            if not self.loss_scaling:
                return jax.value_and_grad(loss_fn, has_aux=True)(trained)
            (loss, metrics), grads, _ = scaling.scaled_value_and_grad(
                loss_fn, trained, state.loss_scale)
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
                    lambda x: jnp.zeros((d,) + x.shape, jnp.float32), trained),
                    acc_shardings))
        (loss, metrics, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(n)))
        # One reduction over the shards; back to each parameter's dtype, so the
        # optimizer state keeps its dtypes.
        grads = jax.tree.map(lambda g, p: jnp.sum(g, axis=0).astype(p.dtype), grads, trained)
        return loss, metrics, grads

    def _train_step(self, state: TrainState, batch: dict, rng: jax.Array,
                    teacher_params: PyTree | None = None):
        loss, metrics, grads = self.loss_and_grads(state, batch, rng, teacher_params)
        grads = jax.lax.with_sharding_constraint(grads, self.grad_shardings)
        # Under every policy a step whose loss or gradients are not finite is skipped
        # (float16 overflow is only the common case; bf16 and fp32 runs diverge too).
        finite = jnp.isfinite(loss) & scaling.all_finite(grads)
        if self.frozen:  # set_to_zero never reads the frozen zeros: XLA drops them
            grads = param_tree.overlay(jax.tree.map(jnp.zeros_like, state.params), grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(self.cfg, state.step, state.lr_horizon)
        updates = jax.tree.map(lambda u: u * lr.astype(u.dtype), updates)
        # Magnitude pruning: pruned weights become (and stay) exactly 0; a no-op without.
        params = prune.apply_masks(optax.apply_updates(state.params, updates), opt_state)
        if self.frozen:  # frozen parameters stay bit-identical (x + 0 turns -0.0 into 0.0)
            params = param_tree.overlay(state.params, self.trained(params))
            grads = self.trained(grads)
        # A skipped step keeps the old parameters and optimizer state: a leaf-wise
        # select (Flax's DynamicScale recipe), so the step has no data-dependent
        # control flow; the update is computed either way.
        params = scaling.select_tree(finite, params, state.params)
        opt_state = scaling.select_tree(finite, opt_state, state.opt_state)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=lr,
                       source_tokens=jnp.sum(batch["encoder_input_tokens"] > 0),
                       skipped=1 - finite.astype(jnp.int32))
        if (pruning := prune.find_state(opt_state)) is not None:  # zeros among the targets
            metrics = dict(metrics, sparsity=prune.sparsity(params, pruning))
        loss_scale = None
        if self.loss_scaling:
            loss_scale = scaling.update_loss_scale(state.loss_scale, finite,
                                                     self.cfg.loss_scale_growth_interval)
            metrics = dict(metrics, loss_scale=loss_scale.scale)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          loss_scale=loss_scale, lr_horizon=state.lr_horizon), metrics

    def _jitted_step(self):
        p = self.partitioner
        teacher = () if self.teacher is None else (self.teacher_shardings,)
        return p.jit(self._train_step,
                     in_shardings=(self.state_shardings, p.batch_sharding, p.replicated,
                                   *teacher),
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
        teacher = () if self.teacher is None else (self.teacher_abstract,)
        return self._jitted_step().lower(self.abstract_state, batch, rng, *teacher).compile()

    def step_fn(self) -> Callable:
        """The jitted step ``(state, batch, rng) -> (state, metrics)`` with explicit in/out
        shardings; the old state is donated. With a teacher, :attr:`teacher_params` go
        in as the step's fourth argument."""
        if self._step_fn is None:
            self._step_fn = self._jitted_step()
        if self.teacher is None:
            return self._step_fn
        if self.teacher_params is None:
            raise ValueError("Trainer has a teacher but no teacher_params: place_teacher first")
        step, teacher = self._step_fn, self.teacher_params
        return lambda state, batch, rng: step(state, batch, rng, teacher)

    def compiled_shapes(self) -> int:
        """How many times :meth:`step_fn`'s step has been compiled: one per batch shape
        it has seen (bucketed batching has several), 0 before the first step."""
        return 0 if self._step_fn is None else self._step_fn.compile_count
