"""Token-level knowledge distillation (``TrainConfig.distill``), with tiny models.

* the loss: alpha = 0 is the cross entropy exactly (loss and gradients); alpha = 1 with
  the teacher's own parameters gives KL = 0 and no gradient; a student trained towards
  a fixed teacher lowers the KL; the mapped KD equals a numpy reference;
* the teacher in the step: microbatches and a sharded mesh (fsdp x tensor) give the
  one-device, one-batch loss and gradients; an adapter teacher routes by the batch's
  ids; ``compile_step`` counts the teacher's parameters as step arguments;
* the vocabulary check: identical vocabularies pass, different ones are a clear error,
  ``vocab_mapping`` pairs the shared pieces and reports the coverage;
* ``train()`` with a teacher directory (a gin binding) writes checkpoints and logs both terms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt.compress import distill
from jaxmt.config import (AdapterConfig, DataConfig, DistillConfig, MeshConfig, ModelConfig,
                          TrainConfig)
from jaxmt.modeling.model import distill_kl
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.trainer import Trainer, TrainState

TINY = dict(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
            num_encoder_layers=1, num_decoder_layers=1, precision="fp32")
STUDENT = ModelConfig(**TINY)
TEACHER = ModelConfig(**dict(TINY, emb_dim=48, num_encoder_layers=2, mlp_dim=96))
ONE = MeshConfig(data=-1)


def _trainer(alpha=0.5, teacher=TEACHER, mesh=ONE, micro=1, devices=1, **train):
    """A Trainer on the first ``devices`` devices (one by default: it compiles fastest)."""
    cfg = TrainConfig(batch_size=8, steps=10, warmup_steps=0, optimizer="adamw",
                      num_microbatches=micro, label_smoothing=0.1,
                      distill=DistillConfig(alpha=alpha, temperature=2.0), **train)
    return Trainer(STUDENT, cfg, Partitioner(mesh, jax.devices()[:devices]), 8, 8,
                   teacher_cfg=teacher)


def _init(model, seed: int):
    """Random parameters of ``model``'s shapes, drawn by numpy (compiling Flax's init
    costs seconds): matrices ~ N(0, 1 / fan_in), vectors (norm scales) ~ 1 + N(0, 0.01)."""
    rng = np.random.default_rng(seed)
    def draw(x):
        z = rng.normal(size=x.shape).astype(np.float32)
        return z * x.shape[0] ** -0.5 if x.ndim > 1 else 1 + 0.1 * z
    return jax.tree.map(draw, model.param_shapes())


def _teacher_params(tr: Trainer, seed: int = 1):
    return _init(tr.teacher, seed)


def _state(tr: Trainer, seed: int = 0) -> TrainState:
    """A state with the student's parameters only: enough for loss_and_grads."""
    return TrainState(step=jnp.array(0, jnp.int32), params=_init(tr.model, seed), opt_state=None)


def _loss_and_grads(tr: Trainer, state, batch, teacher=None):
    batch = tr.partitioner.shard_batch(batch, 8)
    args = () if teacher is None else (teacher,)
    return tr.partitioner.jit(tr.loss_and_grads)(state, batch, jax.random.PRNGKey(0), *args)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------- the loss

def test_alpha_zero_is_the_cross_entropy_exactly():
    plain = _trainer(teacher=None)
    tr = _trainer(alpha=0.0)
    state = _state(plain)
    tr.place_teacher(_teacher_params(tr))
    batch = plain.model.random_batch(8, 8, 8)
    l0, m0, g0 = _loss_and_grads(plain, state, batch)
    l1, m1, g1 = _loss_and_grads(tr, state, batch, tr.teacher_params)
    assert float(l0) == float(l1)
    assert all(np.array_equal(a, b) for a, b in zip(_host(g0), _host(g1)))
    # The KD term is still measured, and the CE term is the plain loss.
    assert float(m1["kd_sum"]) > 0 and float(m1["ce_sum"]) == float(m0["loss_sum"])


def test_kl_is_zero_against_itself_and_falls_towards_a_fixed_teacher():
    same = _trainer(alpha=1.0, teacher=STUDENT)
    state = _state(same)
    same.place_teacher(state.params)  # the student is the teacher
    batch = same.model.random_batch(8, 8, 8)
    loss, metrics, grads = _loss_and_grads(same, state, batch, same.teacher_params)
    assert abs(float(metrics["kd_sum"])) < 1e-4 and abs(float(loss)) < 1e-6
    assert max(np.abs(g).max() for g in _host(grads)) < 1e-6

    tr = _trainer(alpha=1.0, learning_rate=3e-3)
    tr.place_teacher(_teacher_params(tr))
    state, step = tr.init_state(0), tr.step_fn()
    batch = tr.partitioner.shard_batch(batch, 8)
    kd = []
    for i in range(6):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        kd.append(float(metrics["kd_sum"]) / float(metrics["tokens"]))
        assert float(metrics["loss_sum"]) == pytest.approx(float(metrics["kd_sum"]))
    assert kd[0] > 0 and kd[-1] < 0.9 * kd[0], kd


def _reference_kd(s, t, w, temp, s_ids, t_ids):
    """Numpy: T^2 * sum_tokens w * KL(softmax(t / T) || softmax(s / T)) over the ids."""
    def log_softmax(x):
        x = x / temp
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    ls, lt = log_softmax(s[..., s_ids]), log_softmax(t[..., t_ids])
    return temp ** 2 * float((w * (np.exp(lt) * (lt - ls)).sum(-1)).sum())


def test_mapped_kd_equals_numpy_and_its_gradient_autodiff():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 5, 12)).astype(np.float32) * 3
    t = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3
    w = (rng.random((2, 5)) > 0.2).astype(np.float32)
    s_ids, t_ids = np.array([0, 2, 3, 7, 11]), np.array([1, 0, 9, 15, 4])
    got = float(distill_kl(s, t, w, 1.5, (s_ids, t_ids)))
    assert got == pytest.approx(_reference_kd(s, t, w, 1.5, s_ids, t_ids), rel=1e-5)
    # Identical vocabularies over the first n ids (padding rows past them left out).
    assert float(distill_kl(s, t, w, 2.0, 10)) == pytest.approx(
        _reference_kd(s, t, w, 2.0, np.arange(10), np.arange(10)), rel=1e-5)

    def naive(s):  # plain autodiff of the same formula
        ls = jax.nn.log_softmax(s[..., s_ids] / 1.5)
        lt = jax.nn.log_softmax(t[..., t_ids] / 1.5)
        return 1.5 ** 2 * jnp.sum(w * jnp.sum(jnp.exp(lt) * (lt - ls), -1))
    g = jax.grad(lambda s: distill_kl(s, t, w, 1.5, (s_ids, t_ids)))(s)
    np.testing.assert_allclose(g, jax.grad(naive)(s), atol=1e-6)
    assert not np.any(np.asarray(g)[..., [1, 4, 5, 6, 8, 9, 10]])  # unshared ids: no gradient


# -------------------------------------------------------------- the teacher in the step

@pytest.fixture(scope="module")
def reference():
    """One device, one batch: the loss, grads, state and teacher parameters."""
    tr = _trainer()
    state = _state(tr)
    teacher = _teacher_params(tr)
    tr.place_teacher(teacher)
    batch = tr.model.random_batch(8, 8, 8, seed=3)
    loss, metrics, grads = _loss_and_grads(tr, state, batch, tr.teacher_params)
    return dict(params=jax.device_get(state.params), teacher=jax.device_get(teacher),
                batch=batch, loss=float(loss), kd=float(metrics["kd_sum"]), grads=_host(grads))


SHARDED = MeshConfig(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("mesh,micro", [(ONE, 2), (SHARDED, 1), (SHARDED, 2)],
                         ids=["micro2", "fsdp_tensor", "fsdp_tensor_micro2"])
def test_microbatches_and_a_sharded_teacher_match_one_device(reference, mesh, micro):
    tr = _trainer(mesh=mesh, micro=micro, devices=8 if mesh == SHARDED else 1)
    state = TrainState(step=jnp.array(0, jnp.int32), opt_state=None, params=jax.device_put(
        reference["params"], jax.tree.map(lambda x: x.sharding, tr.abstract_state.params)))
    tr.place_teacher(reference["teacher"])
    if mesh.tensor > 1:  # the teacher really is split like the student's parameters
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tr.teacher_params))
    loss, metrics, grads = _loss_and_grads(tr, state, reference["batch"], tr.teacher_params)
    assert float(loss) == pytest.approx(reference["loss"], rel=1e-5)
    assert float(metrics["kd_sum"]) == pytest.approx(reference["kd"], rel=1e-5)
    for a, b in zip(_host(grads), reference["grads"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_adapter_teacher_routes_by_the_batch_and_compile_step_counts_it():
    teacher = dataclasses.replace(TEACHER, adapter=AdapterConfig(size=8, langs=("de", "fr")))
    tr = _trainer(teacher=teacher)
    assert "decoder_lang_ids" in tr._dummy  # batches carry the teacher's routing ids
    noise = np.random.default_rng(2)  # adapters start as the identity: move them
    params = jax.tree.map(lambda x: x + 0.2 * noise.normal(size=x.shape).astype(np.float32),
                          jax.device_get(_teacher_params(tr)))
    tr.place_teacher(params)
    state = _state(tr)
    kd = []
    for lang in (0, 1):
        batch = tr.teacher.random_batch(8, 8, 8)
        batch.update(encoder_lang_ids=np.full((8, 8), lang, np.int32),
                     decoder_lang_ids=np.full((8, 8), lang, np.int32))
        kd.append(float(_loss_and_grads(tr, state, batch, tr.teacher_params)[1]["kd_sum"]))
    assert kd[0] != pytest.approx(kd[1], rel=1e-3)
    # AOT (one device): the step's arguments are the state, the teacher's parameters and
    # (those it reads of) the batch with the routing ids and the rng.
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    args = tr.compile_step(8, 8).memory_analysis().argument_size_in_bytes
    fixed = nbytes(tr.abstract_state) + nbytes(params)
    assert fixed < args <= fixed + len(tr._dummy) * 8 * 8 * 4 + 2 * 4


# ------------------------------------------------------------------- vocabularies

@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    from jaxmt.data import vocab

    d = tmp_path_factory.mktemp("vocabs")
    return {n: str(vocab.train_vocab(d / f"v{n}.model", langs, vocab_size=n,
                                     sample_per_lang=300))
            for n, langs in ((360, ("en", "de")), (400, ("en", "fr")))}


def test_vocabulary_check(vocabs):
    small, big = vocabs[360], vocabs[400]
    same = distill.vocab_alignment(small, small)
    assert same.identical and same.kd_ids == 360 and "identical" in same.summary()
    with pytest.raises(ValueError) as e:
        distill.vocab_alignment(big, small)
    msg = str(e.value)
    first = next(i for i, (a, b) in enumerate(zip(distill.model_vocab(big).pieces,
                                                   distill.model_vocab(small).pieces)) if a != b)
    assert big in msg and small in msg and f"at id {first}:" in msg
    assert "DistillConfig.vocab_mapping=True" in msg and "spm.model" in msg

    mapped = distill.vocab_alignment(big, small, mapping=True)
    t, s = distill.model_vocab(big).pieces, distill.model_vocab(small).pieces
    want = [(i, t.index(p)) for i, p in enumerate(s) if p in t]
    assert list(zip(mapped.student_ids, mapped.teacher_ids)) == want
    assert not mapped.identical and 0 < mapped.shared < 360 and len(want) == mapped.shared
    assert f"{100 * len(want) / 360:.1f}% of the student's 360" in mapped.summary()
    assert f"{100 * len(want) / 400:.1f}% of the teacher's 400" in mapped.summary()
    covered = mapped.target_coverage(420)
    assert covered.sum() == len(want) and not covered[360:].any()


def test_a_directory_that_cannot_teach_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="DistillConfig.teacher=.*no such directory"):
        distill.teacher_configs(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="Hugging Face checkpoint; convert it first"):
        distill.teacher_configs(str(tmp_path))
    # The teacher computes in the student's policy when its parameter dtype stays.
    policy = lambda t, s: distill.teacher_model_config(  # noqa: E731
        dataclasses.replace(TEACHER, precision=t), dataclasses.replace(STUDENT, precision=s)
    ).precision
    assert policy("fp32", "bf16") == "bf16" and policy("bf16_params", "fp32") == "bf16_params"
    routed = lambda langs: dataclasses.replace(  # noqa: E731
        STUDENT, adapter=AdapterConfig(size=4, langs=langs))
    with pytest.raises(ValueError, match="route them differently"):
        distill.teacher_model_config(routed(("de",)), routed(("fr",)))


# ------------------------------------------------------------------- end to end

def _digest(root: str) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            h.update(os.path.join(os.path.relpath(d, root), f).encode())
            h.update(open(os.path.join(d, f), "rb").read())
    return h.hexdigest()


def test_train_with_a_teacher_directory(vocabs, tmp_path, capsys):
    """A teacher on another vocabulary (en/fr pieces), mapped; bound through gin."""
    import gin

    from jaxmt import config as cfglib
    from jaxmt.inference.export import write_model
    from jaxmt.modeling.model import EncoderDecoderModel
    from jaxmt.train.run import train

    small = dict(TINY, vocab_size=512)
    teacher_cfg = ModelConfig(**dict(small, emb_dim=48))
    src, teacher_dir, student_dir = (str(tmp_path / n) for n in ("src", "teacher", "student"))
    for d, spm in ((src, vocabs[400]), (student_dir, vocabs[360])):
        os.makedirs(d)
        shutil.copy(spm, os.path.join(d, "spm.model"))
    with open(os.path.join(src, cfglib.CONFIG_FILE), "w") as f:
        f.write(cfglib.to_json(model=teacher_cfg, data=DataConfig(langs=("en", "fr"))))
    write_model(src, teacher_dir, teacher_cfg, _init(EncoderDecoderModel(teacher_cfg), 1), {})
    before = _digest(teacher_dir)
    gin.parse_config([f"DistillConfig.teacher = '{teacher_dir}'", "DistillConfig.alpha = 0.7",
                      "DistillConfig.temperature = 2.0", "DistillConfig.vocab_mapping = True"])
    try:
        train_cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=3,
                                log_every=3)
    finally:
        gin.clear_config()
    assert train_cfg.distill.teacher == teacher_dir
    data = DataConfig(langs=("en", "de"), vocab_size=360, src_len=16, tgt_len=16,
                      max_eval_len=16)
    capsys.readouterr()
    last = train(student_dir, model_cfg=ModelConfig(**small), mesh_cfg=ONE, data_cfg=data,
                 train_cfg=train_cfg, progress=False)
    out = capsys.readouterr().out
    shared = distill.vocab_alignment(teacher_dir, student_dir, mapping=True).shared
    assert (f"distill: teacher {teacher_dir} (step 0; " in out and "alpha 0.7, temperature 2; "
            f"vocabulary mapped over {shared} shared pieces" in out), out
    assert os.path.isdir(os.path.join(student_dir, "checkpoints", "3"))
    summary = json.load(open(os.path.join(student_dir, "train_summary.json")))
    assert summary["kd"] > 0 and summary["ce"] > 0 and 0.5 < summary["kd_covered"] < 1
    assert last["loss"] == pytest.approx(0.3 * last["ce"] + 0.7 * last["kd"], rel=1e-5)
    assert _digest(teacher_dir) == before  # only read
