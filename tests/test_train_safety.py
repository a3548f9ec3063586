"""A run that would damage its model directory is refused before it writes anything,
and non-finite steps are skipped, counted and, too many in a row, stop the run without
ever writing a non-finite checkpoint (under every precision policy)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt import config as cfglib
from jaxmt.checkpoint import CheckpointError, Checkpointer, save_params
from jaxmt.config import DataConfig, MeshConfig, ModelConfig, TrainConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.loop import NonFiniteError, train_loop
from jaxmt.train.trainer import Trainer

TINY = dict(vocab_size=320, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
            num_encoder_layers=1, num_decoder_layers=1)
B, L = 8, 8
POISON = 5  # a batch whose first source token is this has a NaN loss (see _poison)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def trained_dir(tmp_path):
    """A model directory as `jaxmt train` leaves it: configs, vocabulary, a checkpoint."""
    d = tmp_path / "model"
    d.mkdir()
    model, data = ModelConfig(**TINY), DataConfig(vocab_size=300)
    (d / cfglib.CONFIG_FILE).write_text(cfglib.to_json(
        model=model, mesh=MeshConfig(), data=data, train=TrainConfig()))
    (d / cfglib.VOCAB_FILE).write_bytes(b"stands in for spm.model: only its presence counts")
    params = EncoderDecoderModel(model).init(jax.random.PRNGKey(0),
                                             EncoderDecoderModel(model).dummy_batch(1, 4, 4))
    import flax.linen as nn
    save_params(str(d), nn.unbox(params), {"step": 1})
    return d


def test_incompatible_rerun_is_refused_naming_fields_and_changes_no_file(trained_dir):
    from jaxmt.train.run import train

    before = _snapshot(trained_dir)
    other = ModelConfig(**dict(TINY, emb_dim=64, num_heads=4))
    with pytest.raises(ValueError) as e:
        train(str(trained_dir), model_cfg=other, data_cfg=DataConfig(vocab_size=400),
              train_cfg=TrainConfig(optimizer="adamw"), progress=False)
    msg = str(e.value).splitlines()[0]  # gin appends "In call to configurable 'train'"
    for part in ("ModelConfig.emb_dim: 32 there, 64 now", "ModelConfig.num_heads: 2 there, 4 now",
                 "TrainConfig.optimizer: 'adafactor' there, 'adamw' now",
                 "DataConfig.vocab_size: 300 there, 400 now", "nothing was changed",
                 "config.gin"):
        assert part in msg, msg
    assert "\n" not in msg
    assert _snapshot(trained_dir) == before  # byte for byte


def test_compatible_changes_and_corrupt_config(trained_dir):
    from jaxmt.train.run import check_resumable

    # What a resume may change: schedule, steps, dropout, remat, attention, bf16 vs fp32.
    model = ModelConfig(**TINY, dropout_rate=0.1, encoder_remat="full", precision="fp32",
                        attention=cfglib.AttentionConfig(encoder="local", window=4))
    check_resumable(str(trained_dir), model, DataConfig(vocab_size=300, src_len=32,
                                                        langs=("en", "de")),
                    TrainConfig(steps=5000, learning_rate=3e-3))
    with pytest.raises(ValueError, match="precision"):  # bfloat16 parameters: new shapes' dtype
        check_resumable(str(trained_dir), ModelConfig(**TINY, precision="bf16_params"),
                        DataConfig(vocab_size=300), TrainConfig())
    (trained_dir / cfglib.CONFIG_FILE).write_text('{"model": {"emb_dim": ')
    before = _snapshot(trained_dir)
    with pytest.raises(ValueError, match=cfglib.CONFIG_FILE):
        check_resumable(str(trained_dir), ModelConfig(**TINY), DataConfig(vocab_size=300),
                        TrainConfig())
    assert _snapshot(trained_dir) == before


def _poisoned_trainer(policy: str, monkeypatch, **train) -> Trainer:
    """A Trainer whose loss is NaN on batches marked with POISON: the real step, skip
    logic, counters and checkpoints run; only the divergence is injected."""
    cfg = TrainConfig(batch_size=B, warmup_steps=0, log_every=4, checkpoint_every=1,
                      **{"steps": 8, **train})
    tr = Trainer(ModelConfig(**TINY, precision=policy), cfg,
                 Partitioner(MeshConfig(), devices=jax.devices()[:1]), L, L)
    loss = tr.model.loss

    def poisoned(params, batch, **kw):
        value, metrics = loss(params, batch, **kw)
        return jnp.where(batch["encoder_input_tokens"][0, 0] == POISON, jnp.nan, value), metrics
    monkeypatch.setattr(tr.model, "loss", poisoned)
    return tr


def _batches(tr: Trainer, poisoned: set[int]):
    step = 0
    while True:
        b = tr.model.random_batch(B, L, L, seed=step)
        if step in poisoned:
            b["encoder_input_tokens"][0, 0] = POISON
        yield b
        step += 1


def _restore(d, step, tr):
    ck = Checkpointer(str(d), read_only=True)
    return jax.device_get(ck.restore(step, tr.abstract_state.params,
                                     tr.abstract_state.opt_state)[:2])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["bf16", "fp16"])  # fp32 skips as bf16 does
def test_nonfinite_steps_are_skipped_counted_and_too_many_stop(policy, tmp_path, monkeypatch):
    tr = _poisoned_trainer(policy, monkeypatch, steps=12, max_nonfinite_steps=3)
    ckpt = Checkpointer(str(tmp_path), keep=20, async_save=False)
    state, last = train_loop(tr, _batches(tr, {3, 4}), str(tmp_path), ckpt,
                             tr.init_state(0), 0, progress=False)
    ckpt.close()
    assert last["skipped_steps_total"] == 2 and last["skipped_steps"] == 0  # steps 4, 5
    # The skipped steps kept parameters and optimizer state exactly; the others moved them.
    at3, at5, at6 = (_restore(tmp_path, s, tr) for s in (3, 5, 6))
    for a, b in zip(jax.tree.leaves(at3), jax.tree.leaves(at5)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at5[0]),
                                                        jax.tree.leaves(at6[0])))
    # The TensorBoard scalars carry the count.
    events = list((tmp_path / "train").glob("events.out.tfevents.*"))
    assert events and b"skipped_steps" in events[0].read_bytes()

    # Three non-finite steps in a row (the same compiled step, a new run): an error
    # naming them and the last good checkpoint, and no checkpoint is non-finite.
    d = tmp_path / "diverged"
    ckpt = Checkpointer(str(d), keep=20, async_save=False)
    with pytest.raises(NonFiniteError) as e:
        train_loop(tr, _batches(tr, set(range(6, 12))), str(d), ckpt, tr.init_state(0), 0,
                   progress=False)
    ckpt.close()
    msg = str(e.value)
    assert "steps 7-9" in msg and "3 times in a row" in msg and "are those of step 6" in msg
    assert f"last good checkpoint is step 9 in {d / 'checkpoints'}" in msg, msg
    for step in Checkpointer(str(d), read_only=True).all_steps():
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(_restore(d, step, tr)[0]))


@pytest.mark.slow
def test_a_checkpoint_with_nonfinite_parameters_is_never_written(tmp_path, monkeypatch):
    tr = _poisoned_trainer("fp32", monkeypatch, steps=4)
    state = tr.init_state(0)
    state = state.replace(params=jax.tree.map(lambda x: x.at[...].set(jnp.inf), state.params))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(CheckpointError, match="step 1: the parameters are not finite"):
        train_loop(tr, _batches(tr, set()), str(tmp_path), ckpt, state, 0, progress=False)
    assert ckpt.all_steps() == []
    ckpt.close()


def test_nothing_in_jaxmt_unpickles():
    """Model directories are untrusted input: no pickle, torch.load only with
    weights_only=True, and no numpy allow_pickle=True."""
    import ast

    root = Path(__file__).resolve().parent.parent / "jaxmt"
    bad = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib",
                                           "shelve", "marshal") for n in names):
                    bad.append(f"{path}:{node.lineno}: imports {names}")
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if name.endswith("torch.load") and kw.get("weights_only") != "True":
                    bad.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
                if kw.get("allow_pickle") not in (None, "False"):
                    bad.append(f"{path}:{node.lineno}: allow_pickle={kw['allow_pickle']}")
    assert not bad, bad
    assert (root / "inference" / "hf_import.py").read_text().count("weights_only=True") >= 1
