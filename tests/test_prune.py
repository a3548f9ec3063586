"""Pruning: gradual magnitude pruning in training, one-shot unstructured and structured.

* at zero sparsity nothing changes, bit for bit: one-shot, the optax transform, and a
  training run whose ramp has not started equals a run without pruning;
* in training (on a tensor-parallel mesh) every target matrix reaches exactly the
  scheduled count of zeros at the mask steps, pruned weights stay 0, non-targets are not
  pruned, the masks are sharded like the parameters, and the step reports the sparsity;
* a structurally pruned model (T5 with shared relative position tables, and Marian with
  biases, sinusoidal positions and post-norm; unrolled and scanned) computes what the
  full model computes with the removed heads' ``out`` rows and units' ``wo`` rows zeroed;
* `jaxmt prune` writes a smaller model that decodes, and leaves the source as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmt import config as cfglib
from jaxmt.compress import prune
from jaxmt.config import MeshConfig, ModelConfig, PruneConfig, TrainConfig
from jaxmt.modeling import param_tree
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.network import stack_layers
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.trainer import Trainer

TINY = dict(vocab_size=64, emb_dim=16, num_heads=4, head_dim=8, mlp_dim=32,
            num_encoder_layers=2, num_decoder_layers=2, precision="fp32")
T5 = ModelConfig(**TINY)
MARIAN = ModelConfig(**TINY, mlp_activations=("silu",), position_embedding="sinusoidal",
                     norm_type="layer", norm_position="post", norm_epsilon=1e-5, use_bias=True,
                     scale_embeddings=True, tie_embeddings=True, final_logits_bias=True)


def _flat(tree) -> dict[str, np.ndarray]:
    return {param_tree.path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(cfg: ModelConfig, seed: int = 0):
    """Unrolled parameters, random on every leaf (biases too), without compiling an init."""
    shapes = EncoderDecoderModel(dataclasses.replace(cfg, scan_layers=False)).param_shapes()
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)


def _batch(seed=0, b=3, s=11, t=9):
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, 64, (b, s)).astype(np.int32)
    enc[1, 7:] = 0
    dec_in = np.concatenate([np.zeros((b, 1), np.int32),
                             rng.integers(3, 64, (b, t - 1)).astype(np.int32)], 1)
    tgt = np.concatenate([dec_in[:, 1:], np.ones((b, 1), np.int32)], 1)
    return dict(encoder_input_tokens=enc, encoder_segment_ids=(enc > 0).astype(np.int32),
                decoder_input_tokens=dec_in, decoder_target_tokens=tgt,
                decoder_segment_ids=np.ones_like(tgt), decoder_loss_weights=np.ones(tgt.shape,
                                                                                    np.float32))


def _logits(cfg, params, batch):
    return np.asarray(jax.jit(EncoderDecoderModel(cfg).logits)(params, batch))


# ---------------------------------------------------------------- unstructured


def test_one_shot_magnitude_pruning_is_exact_per_matrix_and_layer():
    params = _params(T5)
    same = prune.magnitude_prune_params(params, 0.0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same),
                                                     jax.tree.leaves(params)))
    targets = prune.target_paths(params)
    assert "encoder/layers_1/mlp/wi_0" in targets and "decoder/layers_0/cross_attention/out" \
        in targets and not any("embed" in p or "norm" in p or "relpos" in p for p in targets)
    before, after = _flat(params), _flat(prune.magnitude_prune_params(params, 0.5))
    for p, w in before.items():
        if p not in targets:
            assert np.array_equal(w, after[p]), p  # non-targets are the same arrays
            continue
        zero = after[p] == 0
        assert zero.sum() == math.floor(0.5 * w.size), p
        assert np.abs(w[zero]).max() <= np.abs(w[~zero]).min(), p  # the smallest went
        assert np.array_equal(after[p][~zero], w[~zero])
    # Scanned: each layer's slice is its own matrix, as the unrolled layers are.
    scanned = prune.magnitude_prune_params(stack_layers(params), 0.5)
    want = stack_layers(prune.magnitude_prune_params(params, 0.5))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(scanned),
                                                     jax.tree.leaves(want)))


def _run_transform(tx, params, steps=9):
    """SGD-like updates through ``tx``, jitted; every step's parameters."""
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1.0)) + 0.3, params)
        updates, state = tx.update(grads, state, params)
        return prune.apply_masks(optax.apply_updates(params, updates), state), state

    out = []
    for i in range(steps):
        params, state = step(params, state, i)
        out.append(_flat(params))
    return out, state


def _sgd():
    return optax.sgd(0.01)


def test_transform_schedule_masks_and_zero_sparsity():
    rng = np.random.default_rng(1)
    params = {"enc": {"layers": {"mlp": {"wo": rng.normal(size=(2, 6, 5)).astype(np.float32)}},
                      "attention": {"query": rng.normal(size=(4, 3, 2)).astype(np.float32)}},
              "scale": rng.normal(size=(7,)).astype(np.float32)}
    base, _ = _run_transform(_sgd(), params)
    off = PruneConfig(sparsity=0.0, start_step=0, end_step=6, every=1)
    zero, state = _run_transform(optax.chain(_sgd(), prune.magnitude_pruning(off, 9)), params)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(base, zero) for k in a)
    assert isinstance(state[1].masks["scale"], optax.MaskedNode)  # not a target: no mask

    cfg = PruneConfig(sparsity=0.6, start_step=2, end_step=7, every=2)  # due: 2, 4, 6, 7
    runs, state = _run_transform(optax.chain(_sgd(), prune.magnitude_pruning(cfg, 100)), params)
    s_of = {t: float(prune.sparsity_at(cfg, t, 100)) for t in range(9)}
    assert s_of[7] == pytest.approx(0.6) and s_of[0] == s_of[2] == 0.0
    want, pruned = 0.0, None
    for t, flat in enumerate(runs):
        if t in (2, 4, 6, 7):
            want = s_of[t]
        counts = [(flat["enc/attention/query"] == 0).sum()] + [
            (flat["enc/layers/mlp/wo"][i] == 0).sum() for i in range(2)]  # per layer
        k = lambda n: math.floor(np.float32(want) * n)  # noqa: E731
        assert counts == [k(24), k(30), k(30)], t
        zeros = {k: v == 0 for k, v in flat.items()}
        if pruned is not None:  # once 0, always 0
            assert all(np.all(zeros[k][pruned[k]]) for k in pruned), t
        pruned = zeros
        assert np.array_equal(flat["scale"], base[t]["scale"])  # non-targets as without
    assert int(state[1].count) == 9


# ---------------------------------------------------------------- in training

TRAIN_TINY = dict(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                  num_encoder_layers=1, num_decoder_layers=1, precision="fp32")


def _train(prune_cfg: PruneConfig | None, mesh: MeshConfig, devices=None, steps=2):
    train = TrainConfig(batch_size=8, steps=10, warmup_steps=0, optimizer="adamw",
                        learning_rate=3e-2, log_every=2,
                        **({"prune": prune_cfg} if prune_cfg else {}))
    tr = Trainer(ModelConfig(**TRAIN_TINY), train, Partitioner(mesh, devices=devices), 8, 8)
    state = tr.init_state(0)
    step = tr.step_fn()
    out = [(_flat(state.params), None, state)]
    for i in range(steps):
        state, metrics = step(state, tr.model.random_batch(8, 8, 8, seed=i), jax.random.PRNGKey(i))
        out.append((_flat(state.params), jax.device_get(metrics), state))
    return tr, out


def test_pruning_before_its_ramp_equals_no_pruning():
    one = dict(mesh=MeshConfig(), devices=jax.devices()[:1])
    _, plain = _train(None, **one)
    tr, ramp_later = _train(PruneConfig(sparsity=0.5, start_step=100, end_step=200), **one)
    assert prune.find_state(ramp_later[-1][2].opt_state) is not None
    for (a, _, _), (b, metrics, _) in zip(plain[1:], ramp_later[1:]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert float(metrics["sparsity"]) == 0.0


def test_training_reaches_the_scheduled_sparsity_on_a_tensor_parallel_mesh(tmp_path):
    cfg = PruneConfig(sparsity=0.5, start_step=1, end_step=4, every=2)  # due: 1, 3, 4
    tr, run = _train(cfg, MeshConfig(data=4, tensor=2), steps=6)
    init = run[0][0]
    targets = prune.target_paths(init, cfg.targets)
    want, pruned = 0.0, None
    for t, (flat, metrics, _) in enumerate(run[1:]):
        if t in (1, 3, 4):
            want = float(prune.sparsity_at(cfg, t, tr.cfg.steps))
        zeros = {p: flat[p] == 0 for p in targets}
        for p in targets:
            assert zeros[p].sum() == math.floor(np.float32(want) * flat[p].size), (t, p)
            if pruned is not None:
                assert np.all(zeros[p][pruned[p]]), (t, p)  # pruned weights stay 0
        pruned = zeros
        total = sum(flat[p].size for p in targets)
        assert float(metrics["sparsity"]) == pytest.approx(
            sum(int(z.sum()) for z in zeros.values()) / total)
        for p in set(flat) - targets:  # trained, never pruned
            assert (flat[p] == 0).sum() == (init[p] == 0).sum(), p
    assert want == 0.5 and float(run[-1][1]["sparsity"]) == pytest.approx(0.5, abs=0.01)
    # The masks are laid out like the parameters' optimizer state (Adam's moments).
    state = run[-1][2]
    masks = _flat(prune.find_state(state.opt_state).masks)
    mu = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState)][0].mu
    mask_tree = prune.find_state(state.opt_state).masks
    q = "encoder/layers_0/attention/query"
    leaf = lambda tree: [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]  # noqa: E731
                         if param_tree.path_str(p) == q][0]
    assert masks[q].dtype == bool
    assert leaf(mask_tree).sharding.spec == leaf(mu).sharding.spec
    assert "tensor" in jax.tree.leaves(tuple(leaf(mask_tree).sharding.spec))
    # The train loop logs the sparsity, and the masks checkpoint and restore.
    from jaxmt.checkpoint import Checkpointer
    from jaxmt.train.loop import train_loop

    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
    batches = (tr.model.random_batch(8, 8, 8, seed=i) for i in range(100))
    state, last = train_loop(tr, batches, str(tmp_path), ckpt, state, 6, progress=False)
    assert last["sparsity"] == pytest.approx(0.5, abs=0.01)
    restored, _ = tr.restore_state(ckpt, tr.cfg.steps)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(prune.find_state(restored.opt_state)),
                    jax.tree.leaves(prune.find_state(state.opt_state))):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- structured


def _masked(params, plan, num_heads, mlp_dim):
    """The full model's parameters with the removed heads' ``out`` rows and units' ``wo``
    rows zeroed (the removed heads' other weights and the shared tables left as they are)."""
    def walk(node, prefix):
        if not isinstance(node, dict):
            return node
        keep = plan.get(prefix)
        out = {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in node.items()}
        if keep is not None and ("out" in node or "wo" in node):
            k = "out" if "out" in node else "wo"
            drop = np.setdiff1d(np.arange(num_heads if k == "out" else mlp_dim), keep)
            out[k] = np.array(node[k])
            out[k][drop] = 0
        return out
    return walk(params, "")


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_structured_pruning_equals_the_masked_full_model(family):
    cfg = {"t5": T5, "marian": MARIAN}[family]
    params, batch = _params(cfg), _batch()
    plan = prune.plan_structured(params, cfg, 0.5)
    # Heads that share a stack's relative position table are one set for all its layers.
    if family == "t5":
        for stack, name in (("encoder", "attention"), ("decoder", "self_attention")):
            sets = [tuple(plan[f"{stack}/layers_{i}/{name}"]) for i in range(2)]
            assert sets[0] == sets[1] == tuple(plan[f"{stack}/relpos_bias"])
    else:
        assert not any("relpos" in p for p in plan)
    small, small_cfg = prune.prune_structured(params, cfg, 0.5)
    assert (small_cfg.num_heads, small_cfg.mlp_dim) == (2, 16)
    assert small_cfg == dataclasses.replace(cfg, num_heads=2, mlp_dim=16)
    shapes = jax.tree.map(lambda s: s.shape, EncoderDecoderModel(small_cfg).param_shapes())
    assert jax.tree.map(np.shape, small) == shapes
    full = _logits(cfg, _masked(params, plan, 4, 32), batch)
    got = _logits(small_cfg, small, batch)
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=1e-5)
    # Scanned: the same pruned model, stacked, computes the same.
    scan = dataclasses.replace(cfg, scan_layers=True)
    small_scan, scan_cfg = prune.prune_structured(stack_layers(params), scan, 0.5)
    assert scan_cfg == dataclasses.replace(small_cfg, scan_layers=True)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(small_scan),
                                                     jax.tree.leaves(stack_layers(small))))
    np.testing.assert_allclose(_logits(scan_cfg, small_scan, batch), full, atol=1e-5, rtol=1e-5)
    # Nothing removed: the same model, bit for bit.
    same, same_cfg = prune.prune_structured(params, cfg, 0.0)
    assert same_cfg == cfg and all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(same), jax.tree.leaves(params)))


def test_structured_choice_follows_importance():
    params = _params(MARIAN)
    cross = params["decoder"]["layers_1"]["cross_attention"]
    cross["out"][2] *= 1e-3  # a head that barely contributes
    mlp = params["encoder"]["layers_0"]["mlp"]
    mlp["wo"][[5, 9]] *= 1e-3
    plan = prune.plan_structured(params, MARIAN, 0.25)  # 4 -> 3 heads, 32 -> 24 units
    assert list(plan["decoder/layers_1/cross_attention"]) == [0, 1, 3]
    assert 5 not in plan["encoder/layers_0/mlp"] and 9 not in plan["encoder/layers_0/mlp"]
    # Data-driven scores (e.g. prune.taylor_importance) decide instead when given.
    grads = jax.tree.map(np.zeros_like, params)
    grads["decoder"]["layers_1"]["cross_attention"]["value"][:, 2] = 1.0
    scores = prune.taylor_importance(params, [grads, grads])
    plan = prune.plan_structured(params, MARIAN, 0.75, importance=scores)
    assert list(plan["decoder/layers_1/cross_attention"]) == [2]
    with pytest.raises(ValueError, match="would leave none"):
        prune.plan_structured(params, MARIAN, 0.9)
    lora = dataclasses.replace(MARIAN, lora=cfglib.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="jaxmt export --merge_lora"):
        prune.plan_structured(params, lora, 0.5)


# ---------------------------------------------------------------- CLI


def _snapshot(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha1(
        open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import sentencepiece as spm

    from jaxmt.checkpoint import save_params

    d = tmp_path_factory.mktemp("prune") / "model"
    d.mkdir()
    sents = ["In the beginning God created the heaven and the earth.",
             "Am Anfang schuf Gott Himmel und Erde."] * 20
    with open(d / cfglib.VOCAB_FILE, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sents), model_writer=f, vocab_size=60,
            user_defined_symbols=["<2en>", "<2de>"], hard_vocab_limit=False, pad_id=0,
            eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (d / cfglib.CONFIG_FILE).write_text(cfglib.to_json(
        model=T5, data=cfglib.DataConfig(langs=("en", "de"), max_eval_len=16),
        train=cfglib.TrainConfig()))
    save_params(str(d), _params(T5), {"step": 1})
    return str(d)


def test_cli_writes_a_smaller_model_that_decodes(model_dir, tmp_path, capsys):
    from jaxmt import cli
    from jaxmt.inference.translator import Translator

    before = _snapshot(model_dir)
    out, sparse = str(tmp_path / "small"), str(tmp_path / "sparse")
    assert cli.main(["prune", f"--model_dir={model_dir}", f"--out={out}",
                     "--structured=0.5"]) == 0
    assert cli.main(["prune", f"--model_dir={model_dir}", f"--out={sparse}",
                     "--sparsity=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "heads 4 -> 2, mlp_dim 32 -> 16" in printed and "50.0% of the" in printed
    base, small = Translator.from_pretrained(model_dir), Translator.from_pretrained(out)
    n = lambda tr: sum(x.size for x in jax.tree.leaves(tr.params))  # noqa: E731
    assert small.model.cfg.num_heads == 2 and n(small) < n(base)
    assert len(small.translate(["In the beginning.", "Und die Erde."], "en", "de",
                               strategy="greedy", max_len_a=0.0, max_len_b=6)) == 2
    sparse_params = Translator.from_pretrained(sparse).params
    flat = _flat(sparse_params)
    assert all((flat[p] == 0).mean() == 0.5 for p in prune.target_paths(sparse_params))
    assert _snapshot(model_dir) == before
