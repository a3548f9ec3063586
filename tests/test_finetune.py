"""Starting from a pretrained base: freezing, ``--init_from``, adapter/LoRA checkpoints.

* frozen parameters stay bit-identical through training steps (on a mesh and with
  gradient accumulation too) and get no optimizer state;
* ``train(init_from=...)`` from a jaxmt base with adapters or LoRA: the base directory
  is byte-identical afterwards, the checkpoints hold only the trained parameters, the
  model loads with its base, a changed base is refused, and ``export --merge_lora``
  gives the same translations as the unmerged model;
* an architecture setting over the base, or training over a converted directory, is a
  clear error.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxmt.config import (AdapterConfig, DataConfig, LoraConfig, MeshConfig, ModelConfig,
                          TrainConfig)
from jaxmt.modeling import param_tree
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.trainer import Trainer

TINY = dict(vocab_size=1024, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
            num_encoder_layers=2, num_decoder_layers=2, precision="fp32")


def _flat(tree) -> dict[str, np.ndarray]:
    return {param_tree.path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


ADDED = dict(adapter=AdapterConfig(size=8, langs=("de", "fr")), lora=LoraConfig(rank=2))


# Two meshes cover the cases (one device, dp alone and adapters on fsdp alone were
# dropped for the suite's time: each is a sub-case of these).
@pytest.mark.parametrize("mesh,micro,added", [
    (MeshConfig(data=2, fsdp=2, tensor=2), 2, {}),
    (MeshConfig(data=4, tensor=2), 2, dict(ADDED, scan_layers=True, encoder_remat="full"))],
    ids=["fsdp_tp_micro", "adapters_lora_tp_scan_remat_micro"])
def test_frozen_parameters_stay_bit_identical(mesh, micro, added):
    model = ModelConfig(**dict(TINY, vocab_size=64), **added)
    train = TrainConfig(batch_size=16, steps=10, warmup_steps=0, num_microbatches=micro,
                        trainable=() if added else (r"decoder/.*",), optimizer="adamw")
    tr = Trainer(model, train, Partitioner(mesh), 16, 16)
    state = tr.init_state(0)
    # The added parameters start as the identity (up / B = 0): make every one count.
    noisy = lambda p, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype) \
        if p in tr.trainable and added else x  # noqa: E731
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: noisy(param_tree.path_str(p), x), state.params)
    state = state.replace(params=jax.device_put(params, jax.tree.map(
        lambda x: x.sharding, state.params)))
    before = _flat(state.params)
    step = tr.step_fn()
    for i in range(2):
        batch = tr.model.random_batch(16, 16, 16, seed=i)
        if added:  # rows of three routes: de, fr, and none (-1)
            for k in ("encoder_lang_ids", "decoder_lang_ids"):
                batch[k] = np.repeat(np.array([0, 1, -1, 1] * 4, np.int32)[:, None], 16, 1)
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
    after = _flat(state.params)
    want = ({p for p in before if "/adapter/" in p or "_lora_" in p} if added
            else {p for p in before if p.startswith("decoder/")})
    assert tr.frozen and tr.trainable == want
    for p in tr.frozen:
        assert np.array_equal(before[p], after[p]), p
    assert all(not np.array_equal(before[p], after[p]) for p in tr.trainable)
    # No optimizer state for frozen parameters: every state array is a trained one's.
    assert tr.optimizer_bytes() < tr.optimizer_bytes(frozen=False)
    assert np.isfinite(float(metrics["loss"]))


def test_adapters_freeze_the_base_by_default_and_trainable_must_match():
    model = ModelConfig(**dict(TINY, vocab_size=64), adapter=AdapterConfig(size=8, langs=("es",)),
                        lora=LoraConfig(rank=2))
    tr = Trainer(model, TrainConfig(batch_size=8), Partitioner(MeshConfig(data=-1)), 8, 8)
    assert tr.trainable and all("adapter" in p or "_lora_" in p for p in tr.trainable)
    assert tr.num_params(True) < 0.5 * tr.num_params()
    with pytest.raises(ValueError, match="TrainConfig.trainable.*match no parameter"):
        Trainer(model, TrainConfig(batch_size=8, trainable=("nothing/.*",)),
                Partitioner(MeshConfig(data=-1)), 8, 8)


# ----------------------------------------------------------------------------- end to end

def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(d, f)
            h.update(os.path.relpath(path, root).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


DATA = DataConfig(langs=("en", "de"), vocab_size=1000, vocab_sample_per_lang=2000, src_len=32,
                  tgt_len=32, max_eval_len=32)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from jaxmt.train.run import train

    d = str(tmp_path_factory.mktemp("base") / "model")
    train(d, model_cfg=ModelConfig(**TINY), mesh_cfg=MeshConfig(data=-1), data_cfg=DATA,
          train_cfg=TrainConfig(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=4,
                                log_every=2), progress=False)
    return d


def _finetune(base_dir, model_dir, steps=4, **model_fields):
    from jaxmt.train.run import train

    data = DataConfig(langs=("en", "de", "fr"), vocab_size=1000, src_len=32, tgt_len=32,
                      max_eval_len=32)
    return train(model_dir, model_cfg=ModelConfig(precision="fp32", **model_fields),
                 mesh_cfg=MeshConfig(data=-1), data_cfg=data,
                 train_cfg=TrainConfig(steps=steps, batch_size=8, warmup_steps=1,
                                       learning_rate=1e-2, checkpoint_every=steps, log_every=2),
                 progress=False, init_from=base_dir)


@pytest.mark.slow
def test_adapter_run_saves_only_adapters_and_loads_with_its_base(base_dir, tmp_path):
    from jaxmt.checkpoint import Checkpointer
    from jaxmt.inference import pretrained
    from jaxmt.inference.translator import Translator

    digest = _tree_digest(base_dir)
    out = str(tmp_path / "adapters")
    last = _finetune(base_dir, out, adapter=AdapterConfig(size=8, langs=("fr",)))
    assert last["loss"] > 0
    assert _tree_digest(base_dir) == digest  # the base is only read
    rec = json.load(open(os.path.join(out, pretrained.BASE_FILE)))
    assert rec["saved"] == "trainable" and rec["init_from"] == os.path.abspath(base_dir)
    assert os.path.exists(os.path.join(out, "spm.model"))  # its own copy of the vocabulary
    # The checkpoint's params item holds the adapters only.
    ckpt = Checkpointer(out, async_save=False, read_only=True)
    params_dir = os.path.join(ckpt.directory, str(ckpt.latest_step()), "params")
    ckpt.close()
    stored = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
    stored_paths = param_tree.paths(stored.tree)
    assert stored_paths and all("/adapter/" in p for p in stored_paths)
    # Loads with its base: en->de routes to no adapter, so it is the base's output.
    texts = ["In the beginning God created the heaven and the earth."]
    ft = Translator.from_pretrained(out)
    base = Translator.from_pretrained(base_dir)
    assert ft.translate(texts, "en", "de", strategy="greedy") == base.translate(
        texts, "en", "de", strategy="greedy")
    ft.translate(texts, "en", "fr", strategy="greedy")  # the new language is known
    # A base that changed since is refused, with the reason.
    cfg_path = os.path.join(base_dir, "jaxmt_config.json")
    original = open(cfg_path).read()
    try:
        open(cfg_path, "w").write(original.replace('"log_every": 2', '"log_every": 3'))
        with pytest.raises(ValueError, match="has changed since"):
            Translator.from_pretrained(out)
    finally:
        open(cfg_path, "w").write(original)


@pytest.mark.slow
def test_lora_export_merged_equals_unmerged(base_dir, tmp_path):
    from jaxmt.inference.export import export
    from jaxmt.inference.translator import Translator

    out = str(tmp_path / "lora")
    _finetune(base_dir, out, steps=6, lora=LoraConfig(rank=4, alpha=8.0))
    texts = ["In the beginning God created the heaven and the earth.", "Jesus wept."]
    unmerged = Translator.from_pretrained(out).translate(texts, "en", "fr", strategy="greedy")
    merged_dir = str(tmp_path / "merged")
    tr = export(out, merged_dir, merge_lora=True)
    assert tr.model.cfg.lora.rank == 0
    again = Translator.from_pretrained(merged_dir)
    assert again.model.cfg.lora.rank == 0
    assert again.translate(texts, "en", "fr", strategy="greedy") == unmerged


@pytest.mark.slow
def test_architecture_over_a_base_is_an_error_and_the_dir_is_untouched(base_dir, tmp_path):
    digest = _tree_digest(base_dir)
    with pytest.raises(ValueError, match=r"ModelConfig\.num_heads=8.*the base has 2"):
        _finetune(base_dir, str(tmp_path / "x"), num_heads=8)
    assert not os.path.exists(tmp_path / "x" / "jaxmt_config.json")
    assert _tree_digest(base_dir) == digest


# ----------------------------------------------------------------------------- Hugging Face

@pytest.mark.slow
def test_init_from_hugging_face_t5_first_step_loss_equals_transformers(tmp_path):
    """`--init_from` a converted Hugging Face T5: the first step's loss is transformers'
    loss on the same batch (fp32), with the checkpoint's own tokenizer and T5's text
    prefix; the base is byte-identical after. The Hugging Face folder itself, as a base,
    gives the same parameters."""
    torch = pytest.importorskip("torch", reason="needs torch (pip install 'jaxmt[hf]')")
    transformers = pytest.importorskip("transformers", reason="needs transformers ('jaxmt[hf]')")
    import sentencepiece as spm
    from spm_models import train_spm

    from jaxmt.data import pipeline
    from jaxmt.data.embedded import load_split
    from jaxmt.train.run import train

    torch.set_num_threads(1)
    _, texts = load_split("train", ["en", "de"])
    lines = [t for t in texts["en"][:300] + texts["de"][:300] if t]
    model_bytes = train_spm(lines, 400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    hf_dir = tmp_path / "t5"
    hf_dir.mkdir()
    (hf_dir / "spiece.model").write_bytes(model_bytes)
    n = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(
        # Original T5 (ReLU, tied embeddings): transformers 5 ties every T5's output layer
        # at run time, so an untied one would not be what it computes (stack notes).
        vocab_size=n, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="relu", decoder_start_token_id=0, dropout_rate=0.0,
        relative_attention_num_buckets=16, relative_attention_max_distance=32)).eval()
    ref.save_pretrained(hf_dir)
    from jaxmt.inference import pretrained
    from jaxmt.inference.hf_import import convert
    from jaxmt.inference.translator import make_partitioner, param_placement

    base_dir = tmp_path / "converted"
    convert(str(hf_dir), str(base_dir))
    loaded = {}
    for d in (hf_dir, base_dir):
        b = pretrained.describe(str(d))
        loaded[d] = _flat(pretrained.load_params(b, param_placement(b.model,
                                                                    make_partitioner())))
    assert loaded[hf_dir].keys() == loaded[base_dir].keys()
    assert all(np.array_equal(loaded[hf_dir][k], loaded[base_dir][k]) for k in loaded[hf_dir])
    digest = _tree_digest(str(base_dir))
    # training it in place would start from random weights: refused
    with pytest.raises(ValueError, match="is an imported checkpoint.*--init_from"):
        train(str(base_dir), model_cfg=ModelConfig(precision="fp32"), progress=False)

    data = DataConfig(langs=("en", "de"), src_len=32, tgt_len=32, batching="pad")
    steps = TrainConfig(steps=1, batch_size=8, warmup_steps=0, label_smoothing=0.0, z_loss=0.0,
                        log_every=1, checkpoint_every=1, seed=3)
    out = str(tmp_path / "ft")
    last = train(out, model_cfg=ModelConfig(precision="fp32"), mesh_cfg=MeshConfig(data=-1),
                 data_cfg=data, train_cfg=steps, progress=False, init_from=str(base_dir))
    assert _tree_digest(str(base_dir)) == digest  # DIR is byte-identical after the run
    saved = json.load(open(os.path.join(out, "jaxmt_config.json")))
    assert saved["tokenizer"]["input_prefix"] == "translate {src_name} to {tgt_name}: "
    assert os.path.exists(os.path.join(out, "spiece.model"))

    # The run's first batch (the same stream: the registered mixture, seed and batching).
    batch = next(pipeline.train_batches("jaxmt_bible_mix", 32, 32, 8, seed=steps.seed,
                                        batching="pad"))
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    first = sp.decode([int(t) for t in batch["encoder_input_tokens"][0] if t > 1])
    assert first.startswith("translate English to German: ") or first.startswith(
        "translate German to English: ")
    enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
    labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)
    labels[labels == 0] = -100
    with torch.no_grad():
        want = float(ref(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels).loss)
    assert abs(float(last["loss"]) - want) < 1e-4, (float(last["loss"]), want)
    # `jaxmt data cache` tokenises with the base's tokenizer, as train does; on a few
    # hundred pairs of one's own (DataConfig.corpora, the same command path), not the
    # embedded corpus's 58k (tests/test_data_cache.py caches those).
    import gin

    from jaxmt import cli
    from jaxmt import config as cfglib
    from jaxmt.data import cache
    from jaxmt.data.embedded import parallel_pairs
    from jaxmt.inference.tokenizer import text_format

    corpus = tmp_path / "en-de.tsv"
    corpus.write_text("".join(f"{en}\t{de}\n" for en, de in
                              parallel_pairs("en", "de", "train")[0][:300]), encoding="utf-8")
    gin.clear_config()
    try:
        assert cli.main(["data", "cache", "--model_dir", out, "--num_shards", "1",
                         f"--gin.DataConfig.corpora=[{{'path': '{corpus}', 'src_lang': 'en', "
                         "'tgt_lang': 'de'}]"]) == 0
    finally:
        gin.clear_config()
    cfgs = cfglib.load(out)
    fmt = text_format(out, cfgs["tokenizer"], cfgs["model"].vocab_size)
    assert cache.is_usable(os.path.join(out, "data_cache"), "jaxmt_corpus_mix", fmt)



def test_stored_configs_ignore_this_runs_gin_bindings_for_fields_they_lack():
    """A base written before adapters existed has no `adapter` field: reading it while the
    run binds AdapterConfig.size must give the declared default, not the binding (else the
    base would seem to have the run's adapters)."""
    import dataclasses

    import gin

    from jaxmt import config as cfglib

    text = cfglib.to_json(model=ModelConfig(**TINY))
    raw = json.loads(text)
    del raw["model"]["adapter"], raw["model"]["lora"], raw["model"]["attention"]
    gin.clear_config()
    try:
        gin.parse_config(["AdapterConfig.size = 48", 'AdapterConfig.langs = ("es",)',
                          "LoraConfig.rank = 4", 'AttentionConfig.encoder = "local"'])
        model = cfglib.from_json(json.dumps(raw))["model"]
        assert ModelConfig().adapter.size == 48  # the binding is live
    finally:
        gin.clear_config()
    assert model.adapter == AdapterConfig() and model.lora == LoraConfig()
    assert model.attention.encoder == "xla"
    assert dataclasses.replace(model, precision="fp32") == ModelConfig(**TINY)
