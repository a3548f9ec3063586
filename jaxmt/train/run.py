"""``jaxmt train``: the gin entry point that builds a run from its configs and trains it.

Vocabulary, seqio mixture, pre-tokenised cache, partitioner, trainer, resume position
and loop, in that order. seqio and TensorFlow are imported here only, inside
:func:`train`, so the rest of :mod:`jaxmt.train` stays free of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmt import config as cfglib
from jaxmt import hardware
from jaxmt.checkpoint import Checkpointer
from jaxmt.compress import distill
from jaxmt.config import DataConfig, DecodeConfig, MeshConfig, ModelConfig, TrainConfig
from jaxmt.fileio import write_atomic
from jaxmt.inference import pretrained
from jaxmt.modeling import param_tree
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train import finetune
from jaxmt.train.loop import train_loop
from jaxmt.train.trainer import Trainer, TrainState


@gin.configurable
def train(model_dir: str, model_cfg: ModelConfig | None = None,
          mesh_cfg: MeshConfig | None = None, data_cfg: DataConfig | None = None,
          train_cfg: TrainConfig | None = None, progress: bool = True,
          decode_cfg: DecodeConfig | None = None, init_from: str = "") -> dict:
    """The ``jaxmt train`` entry point: vocabulary, data, sharded state, loop, checkpoints.

    Rerunning on the same ``model_dir`` resumes from the latest checkpoint.

    Args:
      model_dir: where the vocabulary, configs, checkpoints and events go.
      model_cfg, mesh_cfg, data_cfg, train_cfg, decode_cfg: the run's configs (the last
        only stored: how `jaxmt translate` and `eval` decode this model). Each one left None
        is built by gin (``ModelConfig()`` with the parsed bindings), so a notebook or
        test can pass them directly and need no global gin state.
      progress: show a progress bar.
      init_from: a pretrained base to start from (:mod:`jaxmt.train.finetune`): a Hugging
        Face T5/mT5/MarianMT folder, a ``jaxmt convert`` output or a jaxmt model
        directory. Its parameters, architecture and tokenizer are used; it is never
        written to. A resumed run finds its base in ``model_dir/base.json``.

    Returns:
      The last logged metrics; after a SIGTERM/SIGINT, with ``stopped_by`` (the
      signal) and ``stopped_at`` (the step saved).
    """
    from jaxmt.data import cache, pipeline, tasks, vocab  # seqio/TF only from here on

    model_cfg = ModelConfig() if model_cfg is None else model_cfg
    mesh_cfg = MeshConfig() if mesh_cfg is None else mesh_cfg
    data_cfg = DataConfig() if data_cfg is None else data_cfg
    train_cfg = TrainConfig() if train_cfg is None else train_cfg
    decode_cfg = DecodeConfig() if decode_cfg is None else decode_cfg
    # Everything that can refuse the run does so before the first file is written.
    base = _base(model_dir, init_from, model_cfg)
    if base is not None:
        model_cfg = finetune.model_config(base, model_cfg)
        if decode_cfg == DecodeConfig() and base.decode is not None:
            decode_cfg = base.decode  # an imported base's generation defaults
    if model_cfg.quant != "none":  # the run's own, or a quantized --init_from base's
        raise ValueError(f"ModelConfig.quant={model_cfg.quant!r}: a quantized model decodes "
                         "only; train the float model and run `jaxmt quantize`")
    tok_cfg = finetune.tokenizer_config(base, data_cfg) if base is not None else None
    # "auto" becomes a concrete policy here, so the checkpoints' config records the
    # numerics that translate/eval and every resume use.
    requested = model_cfg.precision
    model_cfg, precision_reason = resolve_precision(model_dir, model_cfg)
    check_resumable(model_dir, model_cfg, data_cfg, train_cfg)
    teacher_dir = train_cfg.distill.teacher
    teacher_cfg = None
    if teacher_dir:  # token-level distillation: the teacher must be able to teach
        teacher_cfg = distill.teacher_model_config(
            distill.teacher_configs(teacher_dir)["model"], model_cfg)
    print(f"precision: {model_cfg.precision} ({precision_reason})", flush=True)
    partitioner = Partitioner(mesh_cfg)
    trainer = Trainer(model_cfg, train_cfg, partitioner, data_cfg.src_len, data_cfg.tgt_len,
                      teacher_cfg=teacher_cfg)
    # Over a frozen base, checkpoints keep only what trains; a full fine-tune saves all.
    trainer.save_trained_only = base is not None and bool(trainer.frozen)
    alignment = None
    if teacher_cfg is not None and tok_cfg is None and os.path.exists(
            os.path.join(model_dir, cfglib.VOCAB_FILE)):  # checked before anything is written
        alignment = _align_vocabularies(trainer, teacher_dir, model_dir)
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
    os.makedirs(model_dir, exist_ok=True)
    # Files in the model directory come from process 0 only; the others wait for them.
    lead = jax.process_index() == 0
    spm_path = os.path.join(model_dir, cfglib.VOCAB_FILE)
    if lead:
        sections = dict(model=model_cfg, mesh=mesh_cfg, data=data_cfg, train=train_cfg,
                        decode=decode_cfg)
        if tok_cfg is not None:
            sections["tokenizer"] = tok_cfg
        write_atomic(os.path.join(model_dir, cfglib.CONFIG_FILE), cfglib.to_json(**sections))
        if base is not None:
            finetune.copy_vocab(base, model_dir)
            pretrained.write_record(model_dir, pretrained.record(
                base, "trainable" if trainer.save_trained_only else "full"))
        write_atomic(os.path.join(model_dir, "config.gin"), gin.operative_config_str())
        write_atomic(os.path.join(model_dir, PRECISION_FILE), json.dumps(
            {"requested": requested, "precision": model_cfg.precision,
             "reason": precision_reason, "device": jax.devices()[0].device_kind}, indent=2))
        if not os.path.exists(spm_path) and tok_cfg is None:
            print(f"training SentencePiece vocabulary ({data_cfg.vocab_size} pieces) -> "
                  f"{spm_path}", flush=True)
            vocab.train_for_config(spm_path, data_cfg, train_cfg.seed)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxmt:vocabulary")
    if teacher_cfg is not None and alignment is None:  # the vocabulary exists from here on
        alignment = _align_vocabularies(trainer, teacher_dir, model_dir)
    text_format = None
    if tok_cfg is not None:  # the imported base's tokenizer and target-language signal
        from jaxmt.inference.tokenizer import text_format as make_text_format
        text_format = make_text_format(model_dir, tok_cfg, model_cfg.vocab_size)
    else:
        n_pieces = vocab.load_processor(spm_path).get_piece_size()
        if n_pieces > model_cfg.vocab_size:
            raise ValueError(f"{spm_path}: {n_pieces} pieces exceed ModelConfig.vocab_size="
                             f"{model_cfg.vocab_size}; raise it or lower DataConfig.vocab_size.")
    # The user's files are read and checked once, here (jaxmt/data/sources.py).
    mixture = tasks.register_from_config(data_cfg, spm_path, report_dir=model_dir if lead else None,
                                         text_format=text_format)
    cache_dir = data_cfg.cache_dir or os.path.join(model_dir, cfglib.CACHE_DIR)
    use_cache = cache.is_usable(cache_dir, mixture, text_format or spm_path)  # stale: error
    print(f"data: reading the pre-tokenised cache in {cache_dir}" if use_cache else
          f"data: tokenising on the fly (`jaxmt data cache` writes a cache to {cache_dir})",
          flush=True)
    # Nothing is dropped without a count; the two directions of a pair share a report.
    train_reports = [r["train"] for r in tasks.SKIP_REPORTS.values() if "train" in r]
    for report in {id(r): r for r in train_reports}.values():
        print(f"data {report.summary()}", flush=True)

    ckpt = Checkpointer(model_dir, keep=train_cfg.keep_checkpoints)
    fresh = None
    if base is not None:
        print(f"init_from: {base.directory} ({base.kind}"
              f"{'' if base.step is None else f', step {base.step}'}, fingerprint "
              f"{base.fingerprint[:12]}); trains {trainer.num_params(True) / 1e6:.3f}M of "
              f"{trainer.num_params() / 1e6:.2f}M parameters "
              f"({100 * trainer.num_params(True) / trainer.num_params():.2f}%); optimizer "
              f"state {trainer.optimizer_bytes() / 2**20:.2f} MiB (full fine-tuning: "
              f"{trainer.optimizer_bytes(frozen=False) / 2**20:.2f} MiB)", flush=True)
        if trainer.save_trained_only:  # a resume puts the saved part over these
            trainer.base_params = pretrained.load_params(base, trainer.abstract_state.params)
        fresh = lambda: _from_base(trainer, base)  # noqa: E731
    state, start, saved_meta = resume_state(trainer, ckpt, fresh)
    if start:
        # The saved data position (or, for an older checkpoint, a warning and a reseed).
        position = pipeline.resume_position(saved_meta, seed=train_cfg.seed, step=start,
                                            process_count=jax.process_count(),
                                            cached=use_cache)
    else:
        position = pipeline.position_record(train_cfg.seed, 0, jax.process_count(), use_cache)
    print(f"model: {trainer.num_params() / 1e6:.2f}M parameters; {partitioner} over "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) in "
          f"{jax.process_count()} process(es)", flush=True)
    if start >= train_cfg.steps:
        ckpt.close()
        print(f"already trained to step {start} (TrainConfig.steps={train_cfg.steps})")
        return {}
    spent = float(saved_meta.get("train_seconds", 0.0))
    if train_cfg.max_minutes and spent >= 60 * train_cfg.max_minutes:
        ckpt.close()
        print(f"already trained for {spent / 60:.1f} min, to step {start} "
              f"(TrainConfig.max_minutes={train_cfg.max_minutes:g})")
        return {}
    # The stream depends only on (seed, process index, process count); a resumed run
    # skips the batches it had consumed, so it sees what an uninterrupted run would.
    if position["batches"]:
        print(f"data: skipping {position['batches']} batches to the saved position",
              flush=True)
    if teacher_cfg is not None:
        _load_teacher(trainer, teacher_dir, alignment)
    route = model_cfg.adapter.route_ids if model_cfg.adapter.size else None
    if route is None and teacher_cfg is not None and teacher_cfg.adapter.size:
        route = teacher_cfg.adapter.route_ids  # the teacher's adapters route by the batch
    batches = pipeline.train_batches(
        mixture, data_cfg.src_len, data_cfg.tgt_len,
        partitioner.host_local_batch_size(train_cfg.batch_size), seed=position["seed"],
        shard_index=jax.process_index(), num_shards=jax.process_count(),
        batching=data_cfg.batching, buckets=local_shapes, bucket_stats=bucket_stats,
        start_batch=position["batches"], cache_dir=cache_dir if use_cache else None,
        route=route)
    try:
        _, last = train_loop(trainer, batches, model_dir, ckpt, state, start,
                             progress=progress, data_position=position, train_seconds=spent)
    finally:  # on a crash or Ctrl-C too: let an in-flight async save finish
        ckpt.close()
    if "stopped_at" in last:
        return last
    if bucket_stats is not None:
        print(f"bucketing: compiled {trainer.compiled_shapes()} train-step shape(s) (at most "
              f"{len(local_shapes)}); batches per bucket {bucket_stats.steps}; at most "
              f"{bucket_stats.peak_queued} examples queued on this host", flush=True)
    else:
        print(f"compiled {trainer.compiled_shapes()} train-step shape(s)", flush=True)
    if lead:
        # Rewrite after the run: gin's operative config lists every binding actually used.
        write_atomic(os.path.join(model_dir, "config.gin"), gin.operative_config_str())
        write_atomic(os.path.join(model_dir, "train_summary.json"),
                           json.dumps(dict(last, steps=train_cfg.steps), indent=2))
    return last


def _base(model_dir: str, init_from: str, model_cfg: ModelConfig):
    """The run's base (None without one): ``init_from``, or the one ``model_dir``
    recorded when a fine-tuning run is resumed; checked against the directory."""
    rec = finetune.check_model_dir(model_dir, None) if not init_from else {}
    if not init_from and not rec:
        return None
    if init_from:
        base = pretrained.describe(init_from, scan_layers=model_cfg.scan_layers)
        finetune.check_model_dir(model_dir, base)
        return base
    return pretrained.base_of(model_dir, scan_layers=model_cfg.scan_layers)


def _align_vocabularies(trainer: Trainer, teacher_dir: str, model_dir: str
                        ) -> distill.Alignment:
    """Checks (or with ``vocab_mapping`` maps) the teacher's vocabulary against the
    student's in ``model_dir`` and sets which ids the trainer distils over."""
    alignment = distill.vocab_alignment(teacher_dir, model_dir, trainer.cfg.distill.vocab_mapping)
    trainer.kd_ids = alignment.kd_ids
    if not alignment.identical:
        trainer.kd_targets = alignment.target_coverage(trainer.model.cfg.vocab_size)
    return alignment


def _load_teacher(trainer: Trainer, teacher_dir: str, alignment: distill.Alignment) -> None:
    """Restores the teacher into its shards and prints the run's distillation line."""
    step, params = distill.load_teacher_params(teacher_dir, trainer.teacher_abstract)
    trainer.place_teacher(params)
    t, d = trainer.teacher.cfg, trainer.cfg.distill
    print(f"distill: teacher {teacher_dir} (step {step}; {trainer.teacher_num_params() / 1e6:.2f}M "
          f"parameters, d{t.emb_dim} {t.num_encoder_layers}+{t.num_decoder_layers} layers, "
          f"{t.precision}); alpha {d.alpha:g}, temperature {d.temperature:g}; vocabulary "
          f"{alignment.summary()}", flush=True)


def _from_base(trainer: Trainer, base) -> TrainState:
    """A new state whose parameters are the base's (new adapters/LoRA keep their init)."""
    state = trainer.init_state(trainer.cfg.seed)
    base_params = trainer.base_params
    if base_params is None:
        base_params = pretrained.load_params(base, trainer.abstract_state.params)
    return state.replace(params=param_tree.overlay(state.params, base_params))


def resume_state(trainer: Trainer, ckpt: Checkpointer, fresh=None
                 ) -> tuple[TrainState, int, dict]:
    """``(state, step, meta)`` of the newest checkpoint that restores, else a new state
    at step 0 (``fresh()``, default one from ``TrainConfig.seed``) and empty meta.

    Unreadable newer steps are warned about and set aside (kept, see
    :meth:`~jaxmt.checkpoint.Checkpointer.set_aside`) so this run can write their step
    numbers again; when steps exist but none restores, the CheckpointError stops the
    run: never a silent start from scratch over existing checkpoints.
    """
    found = ckpt.restore_latest(lambda step: trainer.restore_state(ckpt, step))
    if not found:
        return (fresh() if fresh else trainer.init_state(trainer.cfg.seed)), 0, {}
    step, (state, meta) = found
    bad = [s for s in ckpt.all_steps() if s > step]
    if bad:
        print(f"warning: set aside unreadable step(s) {bad} in {ckpt.set_aside(bad)}",
              file=sys.stderr, flush=True)
    print(f"resuming from step {step} in {ckpt.directory}", flush=True)
    return state, step, meta


# Beside jaxmt_config.json (which holds the concrete policy): the latest run's policy,
# why it was chosen and on which device. A note for people, read by nothing.
PRECISION_FILE = "precision.json"


def resolve_precision(model_dir: str, model_cfg: ModelConfig) -> tuple[ModelConfig, str]:
    """``model_cfg`` with a concrete ``precision``, and why it is that one.

    "auto" keeps the policy of a directory that already holds checkpoints (a resume
    keeps its numerics, whatever this machine would pick); otherwise it is what the
    backend computes natively (:func:`jaxmt.hardware.auto_precision`), process 0's choice
    on several hosts, so every process compiles the same program. A policy set
    explicitly stays; the reason then says when "auto" would pick another here.
    """
    local = hardware.auto_precision()

    def unless_auto_agrees(policy: str) -> str:  # on the compute dtype
        same = cfglib.PRECISIONS[policy][0] == cfglib.PRECISIONS[local.policy][0]
        return "" if same else f"; auto would pick {local.policy} here: {local.reason}"

    if model_cfg.precision != "auto":
        return model_cfg, "set by ModelConfig.precision" + unless_auto_agrees(model_cfg.precision)
    path = os.path.join(model_dir, cfglib.CONFIG_FILE)
    if os.path.exists(path) and os.path.isdir(os.path.join(model_dir, "checkpoints")):
        stored = cfglib.load(model_dir).get("model")
        if stored is not None and stored.precision != "auto":
            return (dataclasses.replace(model_cfg, precision=stored.precision),
                    f"kept from {path}: the checkpoints were trained with it"
                    + unless_auto_agrees(stored.precision))
    choice = local
    if jax.process_count() > 1:
        policies = tuple(cfglib.PRECISIONS)
        chosen = policies[int(multihost_utils.broadcast_one_to_all(
            np.int32(policies.index(local.policy))))]
        if chosen != local.policy:
            choice = hardware.PrecisionChoice(chosen, "process 0's choice, so every process "
                                              "compiles the same program"
                                              + unless_auto_agrees(chosen))
    return dataclasses.replace(model_cfg, precision=choice.policy), choice.reason


# ModelConfig fields a resumed run may change: they do not change the parameters or
# what they compute (the attention implementation is the user's speed/accuracy choice).
RESUMABLE_MODEL_FIELDS = ("dropout_rate", "encoder_remat", "decoder_remat", "attention",
                          "precision")
# DataConfig fields that made the directory's spm.model.
VOCAB_FIELDS = ("vocab_size", "vocab_sample_per_lang")


def check_resumable(model_dir: str, model_cfg: ModelConfig, data_cfg: DataConfig,
                    train_cfg: TrainConfig) -> None:
    """Refuses a run whose configs do not fit what ``model_dir`` already holds.

    Checkpoints fix the parameters (every ModelConfig field but
    :data:`RESUMABLE_MODEL_FIELDS`, and the parameter dtype) and the optimizer state
    (``TrainConfig.optimizer``); ``spm.model`` fixes :data:`VOCAB_FIELDS`. Anything
    else (steps, schedule, mesh, data mixture) may change on a resume.

    Raises:
      ValueError: one line listing every differing field, before any file is touched.
    """
    path = os.path.join(model_dir, cfglib.CONFIG_FILE)
    if not os.path.exists(path):
        return
    old = cfglib.load(model_dir)  # a corrupt file is an error too: never overwritten
    diffs = []
    if os.path.isdir(os.path.join(model_dir, "checkpoints")) and "model" in old:
        for f in dataclasses.fields(ModelConfig):
            a, b = getattr(old["model"], f.name), getattr(model_cfg, f.name)
            if f.name not in RESUMABLE_MODEL_FIELDS and a != b:
                diffs.append(f"ModelConfig.{f.name}: {a!r} there, {b!r} now")
        if old["model"].param_dtype != model_cfg.param_dtype:
            diffs.append(f"ModelConfig.precision: {old['model'].precision!r} there, "
                         f"{model_cfg.precision!r} now (parameters in "
                         f"{old['model'].param_dtype}, not {model_cfg.param_dtype})")
        if "train" in old and old["train"].optimizer != train_cfg.optimizer:
            diffs.append(f"TrainConfig.optimizer: {old['train'].optimizer!r} there, "
                         f"{train_cfg.optimizer!r} now")
    if os.path.exists(os.path.join(model_dir, cfglib.VOCAB_FILE)) and "data" in old:
        for name in VOCAB_FIELDS:
            a, b = getattr(old["data"], name), getattr(data_cfg, name)
            if a != b:
                diffs.append(f"DataConfig.{name}: {a!r} there, {b!r} now (spm.model was "
                             "trained with it)")
    if diffs:
        # The remedy first: the CLI shortens long messages from the end.
        raise ValueError(
            f"{model_dir} holds a model trained with other settings, so this run would not "
            f"fit its checkpoints; nothing was changed. Rerun with the run's --gin_file and "
            f"--gin.* settings (its operative config is "
            f"{os.path.join(model_dir, 'config.gin')}) or use a new --model_dir. "
            f"Differences: {'; '.join(diffs)}")
