"""Sharded inference: ``Translator`` and ``jaxmt translate`` on a Partitioner's mesh.

One small random model, restored once on one device and once per mesh over the 8 fake
devices (pure data parallelism, and data x fsdp x tensor): the parameters land in their
rule-given shards, and greedy, beam search (both KV cache reorders) and seeded sampling
give the one-device outputs, ids exactly and scores to float tolerance, with inputs of
different lengths, more of them than one batch, padding rows and a blank line.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxmt import cli
from jaxmt import config as cfglib
from jaxmt.config import MeshConfig
from jaxmt.inference.translator import Translator

CFG = cfglib.ModelConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                         num_encoder_layers=1, num_decoder_layers=1, precision="fp32")
# One source bucket (16 tokens), different lengths, a blank line, two batches of 4.
TEXTS = ["In the beginning.", "Und die Erde war wüst und leer.", "", "God", "And the earth.",
         "Am Anfang schuf Gott Himmel.", "the heaven", "Erde"]
STRATEGIES = {"greedy": dict(strategy="greedy"),
              "beam": dict(strategy="beam", beam_size=2, n_best=2),
              "beam_one_hot": dict(strategy="beam", beam_size=2, n_best=2,
                                   cache_reorder="one_hot"),
              "sample": dict(strategy="sample", num_decodes=2, n_best=2, seed=3)}
MESHES = {"data8": MeshConfig(data=8), "dp2_fsdp2_tp2": MeshConfig(data=2, fsdp=2, tensor=2)}
OPTIONS = dict(batch_size=4, max_src_len=16, max_decode_len=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A jaxmt model directory with random (N(0, 0.3): decisive logits) parameters."""
    import sentencepiece as spm

    from jaxmt.checkpoint import save_params
    from jaxmt.modeling.model import EncoderDecoderModel

    d = tmp_path_factory.mktemp("sharded") / "model"
    d.mkdir()
    sents = ["In the beginning God created the heaven and the earth.",
             "Am Anfang schuf Gott Himmel und Erde.", "And the earth was without form.",
             "Und die Erde war wüst und leer."] * 20
    with open(d / cfglib.VOCAB_FILE, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sents), model_writer=f, vocab_size=60,
            user_defined_symbols=["<2en>", "<2de>"], hard_vocab_limit=False, pad_id=0,
            eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (d / cfglib.CONFIG_FILE).write_text(cfglib.to_json(
        model=CFG, data=cfglib.DataConfig(langs=("en", "de"), max_eval_len=16),
        train=cfglib.TrainConfig()))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype),
                          EncoderDecoderModel(CFG).param_shapes())
    save_params(str(d), params, {"step": 1})
    return str(d)


def _translate_all(tr: Translator) -> dict:
    return {name: tr.translate_n_best(TEXTS, "en", "de", **kw)
            for name, kw in STRATEGIES.items()}


@pytest.fixture(scope="module")
def one_device(model_dir):
    tr = Translator.from_pretrained(model_dir, **OPTIONS)
    return tr, _translate_all(tr)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_mesh_decodes_as_one_device(model_dir, one_device, mesh):
    ref, want = one_device
    tr = Translator.from_pretrained(model_dir, mesh=MESHES[mesh], **OPTIONS)
    assert tr.partitioner.mesh.devices.size == 8 and tr.partitioner.data_parallel_size in (4, 8)
    # Restored straight into the rule-given shards, with the same values.
    kernel = tr.params["decoder"]["layers_0"]["mlp"]["wi_0"]  # [embed 16, mlp 32]
    assert kernel.sharding.is_fully_replicated == (mesh == "data8")
    if mesh == "dp2_fsdp2_tp2":
        assert kernel.sharding.spec == P("fsdp", "tensor")
        assert kernel.addressable_shards[0].data.shape == (8, 16)
    jax.tree.map(np.testing.assert_array_equal, tr.params, ref.params)

    got = _translate_all(tr)
    for name in STRATEGIES:
        assert [[h.text for h in hyps] for hyps in got[name]] == [
            [h.text for h in hyps] for hyps in want[name]], name
        np.testing.assert_allclose([[h.score for h in hyps] for hyps in got[name]],
                                   [[h.score for h in hyps] for hyps in want[name]],
                                   rtol=1e-5, atol=1e-5, err_msg=name)
    assert [h.text for h in got["beam"][2]] == ["", ""]  # the blank line
    # Compiled once per strategy (both batches share a shape), and kept across calls.
    compiled = tr._predict.compile_count
    assert compiled == len(STRATEGIES)
    tr.translate(TEXTS[:3], "en", "de", **STRATEGIES["greedy"])
    assert tr._predict.compile_count == compiled


def test_mesh_flag_errors_name_the_flag(model_dir, capsys):
    """Parsed before JAX loads (tests/test_cli_errors.py); the devices and the model's
    dimensions are checked next, before any weights are read."""
    from jaxmt.cli.model_commands import mesh_config

    parse = lambda s: mesh_config(type("Args", (), {"mesh": s}))
    assert parse(None) is None
    assert parse("data=4,tensor=2") == MeshConfig(data=4, tensor=2)
    assert parse("tensor=2") == MeshConfig(data=-1, tensor=2)  # data: the other devices
    assert parse("fsdp=-1,shard_params=false") == MeshConfig(data=1, fsdp=-1,
                                                             shard_params=False)
    base = ["translate", f"--model_dir={model_dir}", "--src_lang=en", "--tgt_lang=de"]
    for flag, want in (("--mesh=tensor=4", "--mesh=tensor=4: ModelConfig.num_heads=2 is not "
                        "divisible by the `tensor` mesh axis"),
                       ("--mesh=data=16", "--mesh=data=16: MeshConfig(replica=1, data=16, "
                        "fsdp=1, tensor=1) needs 16 devices but 8 are available")):
        with pytest.raises(SystemExit) as e:
            cli.main(base + [flag])
        assert str(e.value.code).startswith(f"error: {want}"), e.value.code


@pytest.mark.slow
def test_translate_command_on_a_mesh(model_dir, one_device, tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    assert cli.main(["translate", f"--model_dir={model_dir}", "--src_lang=en",
                     "--tgt_lang=de", f"--input={src}", f"--output={out}", "--beam=1",
                     "--mesh=data=2,fsdp=2,tensor=2"]) == 0
    want = [hyps[0].text for hyps in one_device[1]["greedy"]]
    assert out.read_text().splitlines() == want
