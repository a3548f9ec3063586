"""Sequence-level distillation data: ``jaxmt distill translate`` and ``DataConfig.distilled``.

* the distilled corpus has exactly one line per training source, in source order, and a
  run interrupted after some chunks then resumed writes the same bytes as an
  uninterrupted one; a finished directory is not decoded again;
* processes split the chunks with no overlap and no gap (the assignment for several
  process counts, and a real 2-process run on 127.0.0.1 that assembles the same file);
* a directory made from another teacher, decoding or sources is refused with one line;
* ``DataConfig.distilled`` registers one distilled Task per direction with the reference
  mixture's rates (alone at rate 1, split with the references at 0.5), whose targets are
  the teacher's outputs; routing ids, ``jaxmt data mixture``, the cache and a few training
  steps work on it.

The teacher is a tiny randomly initialised model (its outputs are noise, but
deterministic noise, which is all the bookkeeping needs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmt import cli
from jaxmt import config as cfglib
from jaxmt.compress import distill_data
from jaxmt.data import distilled, sources

ROOT = Path(__file__).resolve().parent.parent
LANGS = ("en", "de")
N = 40  # sources per direction
CHUNK = 16  # -> chunks of 16, 16, 8 per direction
TINY = cfglib.ModelConfig(vocab_size=2048, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                          num_encoder_layers=1, num_decoder_layers=1, precision="fp32")
DATA = dict(langs=LANGS, vocab_size=2000, src_len=32, tgt_len=32, max_eval_len=32)


@pytest.fixture(autouse=True)
def _clean_gin():
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


def _teacher(path: Path, spm_path, seed: int) -> str:
    """A model directory with random parameters (nothing compiles to make it)."""
    import jax

    from jaxmt.checkpoint import save_params
    from jaxmt.modeling.model import EncoderDecoderModel

    path.mkdir(parents=True)
    shutil.copyfile(spm_path, path / cfglib.VOCAB_FILE)
    (path / cfglib.CONFIG_FILE).write_text(cfglib.to_json(
        model=TINY, data=cfglib.DataConfig(**DATA), train=cfglib.TrainConfig()))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype),
                          EncoderDecoderModel(TINY).param_shapes())
    save_params(str(path), params, {"step": 3})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_path):
    root = tmp_path_factory.mktemp("distill")
    gin_file = root / "run.gin"
    gin_file.write_text("".join(f"DataConfig.{k} = {v!r}\n" for k, v in DATA.items()))
    teacher = _teacher(root / "teacher", spm_path, seed=0)
    return {"root": root, "gin": str(gin_file), "teacher": teacher, "spm": spm_path}


def _argv(setup, out, *extra):
    return ["distill", "translate", f"--teacher={setup['teacher']}",
            f"--gin_file={setup['gin']}", f"--out={out}", f"--max_per_direction={N}",
            f"--chunk_size={CHUNK}", "--beam=2", "--json", *extra]


def _main(argv):
    """``jaxmt ARGV`` in this process (gin parsed afresh: parsing locks its config)."""
    import gin

    gin.clear_config()
    return cli.main(argv)


def _run(capsys, argv) -> dict:
    assert _main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _sources() -> dict:
    pairs = distilled.train_pairs(cfglib.DataConfig(**DATA))
    return {d: [s for s, _ in p[:N]] for d, p in pairs.items()}


def _files(out) -> dict[str, bytes]:
    return {f"{a}-{b}": Path(distilled.train_file(str(out), a, b)).read_bytes()
            for a, b in [("en", "de"), ("de", "en")]}


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """An uninterrupted run's directory (in a subprocess-free, in-process CLI call)."""
    out = setup["root"] / "full"
    assert _main(_argv(setup, out)) == 0
    return out


# ---------------------------------------------------------------- chunks and processes

def test_chunks_cover_every_source_once_for_any_process_count():
    counts = {("en", "de"): 1030, ("de", "en"): 7, ("en", "fr"): 512}
    chunks = distill_data.plan_chunks(counts, 512)
    assert [(c.direction, c.index, c.start, c.stop) for c in chunks] == [
        (("en", "de"), 0, 0, 512), (("en", "de"), 1, 512, 1024), (("en", "de"), 2, 1024, 1030),
        (("de", "en"), 0, 0, 7), (("en", "fr"), 0, 0, 512)]
    for p in (1, 2, 3, 5, 8):
        shares = [distill_data.assigned(chunks, i, p) for i in range(p)]
        flat = [c for share in shares for c in share]
        assert sorted(flat, key=chunks.index) == chunks  # no gap
        assert len(set(flat)) == len(flat) == len(chunks)  # no overlap
        assert all(chunks.index(c) % p == i for i, share in enumerate(shares) for c in share)
    with pytest.raises(ValueError, match="not in"):
        distill_data.assigned(chunks, 2, 2)


def test_empty_outputs_keep_lines_aligned_and_training_skips_them(tmp_path):
    class Teacher:  # empty output for every third source of a call
        def translate(self, texts, src, tgt):
            return ["" if i % 3 == 0 else t.upper() for i, t in enumerate(texts)]

    srcs = {("en", "de"): [f"Sentence number {i}." for i in range(10)]}
    chunks = distill_data.plan_chunks({d: len(t) for d, t in srcs.items()}, 4)  # 4, 4, 2
    run = distill_data.translate_chunks(Teacher(), srcs, chunks, str(tmp_path), progress=False)
    assert (run["chunks"], run["sentences"], run["empty"]) == (3, 10, 5)
    manifest = distill_data.assemble(str(tmp_path), srcs, 4, {})
    assert (manifest["sentences"], manifest["empty"]) == (10, 5)
    path = distilled.train_file(str(tmp_path), "en", "de")
    lines = Path(path).read_text().split("\n")
    assert [ln.split("\t")[0] for ln in lines[:-1]] == srcs[("en", "de")]
    report = sources.Report()
    kept = list(sources.read_pairs(sources.CorpusSource(path, "en", "de"), None, report))
    assert report.skipped["empty_side"] == 5 and kept == [
        (s, s.upper()) for i, s in enumerate(srcs[("en", "de")]) if i % 4 % 3]
    # A chunk that lost a line is refused, not joined.
    part = Path(distill_data.part_path(str(tmp_path), chunks[1]))
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="000001.tsv: 3 lines, expected 4; delete it"):
        distill_data.assemble(str(tmp_path), srcs, 4, {})


def test_the_sources_are_what_training_reads(tmp_path):
    # The user's corpora: the same cleaning and order as the Tasks (read_corpus).
    tsv = tmp_path / "en-de.tsv"
    tsv.write_text("A b.\tA B.\nbad line\nA b.\tA B.\nC d.\tC D.\n\tempty\n")
    cfg = cfglib.DataConfig(corpora=({"path": str(tsv), "src_lang": "en", "tgt_lang": "de"},))
    pairs = distilled.train_pairs(cfg)
    assert pairs == {("en", "de"): [("A b.", "A B."), ("C d.", "C D.")],
                     ("de", "en"): [("A B.", "A b."), ("C D.", "C d.")]}
    # The embedded corpus: the pivot directions, verses in order.
    emb = distilled.train_pairs(cfglib.DataConfig(langs=("en", "de", "fr")))
    assert list(emb) == [("en", "de"), ("en", "fr"), ("de", "en"), ("fr", "en")]
    assert emb[("en", "de")][0][0].startswith("In the beginning God created")


# ---------------------------------------------------------------- resume

def test_resume_gives_the_uninterrupted_bytes_without_gaps_or_duplicates(
        setup, uninterrupted, capsys):
    want = _files(uninterrupted)
    srcs = _sources()
    for (a, b), texts in srcs.items():  # one line per source, in order, TAB the output
        lines = want[f"{a}-{b}"].decode().split("\n")
        assert lines[-1] == "" and [ln.split("\t")[0] for ln in lines[:-1]] == texts
    manifest = json.loads((uninterrupted / distilled.MANIFEST).read_text())
    assert manifest["sentences"] == 2 * N and manifest["beam"] == 2
    assert manifest["teacher"]["step"] == 3 and manifest["teacher"]["path"] == setup["teacher"]

    out = setup["root"] / "resumed"
    with pytest.raises(SystemExit, match=r"stopped after 2 chunk\(s\)"):
        _main(_argv(setup, out, "--stop_after_chunks=2"))
    parts = sorted(p.relative_to(out).as_posix() for p in (out / "parts").rglob("*.tsv"))
    assert parts == ["parts/en-de/000000.tsv", "parts/en-de/000001.tsv"]
    assert not (out / distilled.MANIFEST).exists()
    # The finished chunks hold exactly their lines.
    chunk1 = (out / "parts/en-de/000001.tsv").read_text().split("\n")
    assert [ln.split("\t")[0] for ln in chunk1[:-1]] == srcs[("en", "de")][CHUNK:2 * CHUNK]
    capsys.readouterr()
    r = _run(capsys, _argv(setup, out))
    assert (r["run"]["already"], r["run"]["chunks"], r["run"]["sentences"]) == (2, 4, 2 * N - 32)
    assert _files(out) == want
    # Finished: a rerun decodes nothing (the teacher is not even loaded) and changes nothing.
    r = _run(capsys, _argv(setup, out))
    assert r["run"]["sentences"] == 0 and "notes" not in r
    assert _files(out) == want


@pytest.mark.slow
def test_two_processes_split_the_chunks_and_assemble_the_same_file(setup, uninterrupted,
                                                                   tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    out = tmp_path / "two"
    procs = []
    for i in (0, 1):
        log = open(tmp_path / f"p{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxmt.cli", *_argv(setup, out),
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [
        (tmp_path / f"p{i}.log").read_text()[-3000:] for i in (0, 1)]
    runs = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert [(r["process"], r["processes"]) for r in runs] == [(0, 2), (1, 2)]
    # Chunks 0, 2, 4 (en-de 0, en-de 2, de-en 1) and 1, 3, 5: 16+8+16 and 16+16+8 sources.
    assert [r["run"]["chunks"] for r in runs] == [3, 3]
    assert [r["run"]["sentences"] for r in runs] == [40, 40]
    assert "manifest" in runs[0] and "manifest" not in runs[1]
    assert _files(out) == _files(uninterrupted)


# ---------------------------------------------------------------- refusals

def test_a_directory_from_another_teacher_beam_or_sources_is_refused(
        setup, uninterrupted, spm_path, tmp_path):
    other = _teacher(tmp_path / "other", spm_path, seed=1)
    before = _files(uninterrupted)
    argv = _argv(setup, uninterrupted)
    for change, want in [
            ([f"--teacher={other}"], r"made from another configuration: teacher .*teacher "
                                     r"\(now .*other\)"),
            (["--beam=1"], r"strategy 'beam' \(now 'greedy'\)"),
            (["--beam=3"], r"beam_size 2 \(now 3\)"),
            ([f"--max_per_direction={N - 1}"], r"en-de sources \(40 sentences, now 39\)"),
            ([f"--chunk_size={CHUNK * 2}"], r"chunk_size 16 \(now 32\)")]:
        with pytest.raises(SystemExit) as e:
            _main(argv + change)
        msg = e.value.code
        assert isinstance(msg, str) and "\n" not in msg and msg.startswith("error: --out="), msg
        assert re.search(want, msg), msg
        assert "Pass a new --out, or delete it" in msg
    # The same path and step with other weights: the fingerprint tells.
    changed = tmp_path / "changed"
    shutil.copytree(setup["teacher"], changed)
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    manifest = json.loads((out / distilled.RUN_MANIFEST).read_text())
    manifest["teacher"] = distill_data.teacher_record(str(changed))
    (out / distilled.RUN_MANIFEST).write_text(json.dumps(manifest))
    weights = max((p for p in (changed / "checkpoints").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(SystemExit, match=r"teacher fingerprint [0-9a-f]{12} \(now [0-9a-f]{12}: "
                                         "the teacher changed\)"):
        _main(_argv(setup, out, f"--teacher={changed}"))
    assert _files(uninterrupted) == before


# ---------------------------------------------------------------- training on it

def _data_cfg(out, rate, langs=LANGS):
    return cfglib.DataConfig(**dict(DATA, langs=langs), distilled=str(out), distilled_rate=rate)


IDS = {"en": 0, "de": 1}


def _route(src, tgt):
    return IDS[src], IDS[tgt]


def _check_routing(batches, spm_path):
    """Every example's routing ids are its direction's (its target tag says which)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    batch = next(batches)
    for row in range(len(batch["encoder_input_tokens"])):
        tag = sp.id_to_piece(int(batch["encoder_input_tokens"][row, 0])).lstrip("\u2581")
        tgt = tag[2:-1]  # "<2de>"
        src = "en" if tgt == "de" else "de"
        real = batch["encoder_input_tokens"][row] > 0
        assert set(batch["encoder_lang_ids"][row][real]) == {IDS[src]}, row
        assert set(batch["decoder_lang_ids"][row][batch["decoder_target_tokens"][row] > 0]) \
            == {IDS[tgt]}, row


def test_distilled_mixture_rates_and_targets(setup, uninterrupted, tmp_path):
    seqio = pytest.importorskip("seqio")
    from jaxmt.data import pipeline, tasks

    ref = tasks.register_from_config(cfglib.DataConfig(**DATA), setup["spm"])
    ref_rates = {t.name: seqio.get_mixture_or_task(ref).get_rate(t)
                 for t in seqio.get_mixture_or_task(ref).tasks}
    d_task = {d: f"jaxmt_distilled_{d[0]}_{d[1]}" for d in [("en", "de"), ("de", "en")]}
    r_task = {d: f"jaxmt_bible_{d[0]}_{d[1]}" for d in d_task}

    mix = tasks.register_from_config(_data_cfg(uninterrupted, 1.0), setup["spm"],
                                     report_dir=tmp_path)
    m = seqio.get_mixture_or_task(mix)
    assert {t.name: m.get_rate(t) for t in m.tasks} == pytest.approx(
        {d_task[d]: ref_rates[r_task[d]] for d in d_task})
    assert (tmp_path / f"{distilled.REPORT_STEM}.json").exists()
    # Targets are the teacher's outputs, cleaned as any corpus (every line counted).
    for (a, b), task in d_task.items():
        path = distilled.train_file(str(uninterrupted), a, b)
        report = sources.Report()
        want = list(sources.read_pairs(sources.CorpusSource(path, a, b), None, report))
        assert report.total == N and tasks.SKIP_REPORTS[task]["train"].kept == len(want) > 0
        got = list(seqio.get_mixture_or_task(task).source.get_dataset(
            split="train", shuffle=False).as_numpy_iterator())
        assert [(x["inputs"].decode(), x["targets"].decode()) for x in got] == [
            (f"<2{b}> {s}", t) for s, t in want]
        assert {x["src_lang"].decode() + x["tgt_lang"].decode() for x in got} == {a + b}

    mix = tasks.register_from_config(_data_cfg(uninterrupted, 0.5), setup["spm"])
    m = seqio.get_mixture_or_task(mix)
    want = {**{d_task[d]: 0.5 * ref_rates[r_task[d]] for d in d_task},
            **{r_task[d]: 0.5 * ref_rates[r_task[d]] for d in d_task}}
    assert {t.name: m.get_rate(t) for t in m.tasks} == pytest.approx(want)
    # Routing ids come from each example's direction, distilled or reference.
    _check_routing(pipeline.train_batches(mix, 32, 32, 8, seed=0, batching="pad", threads=1,
                                          route=_route), setup["spm"])
    # The rate table names both Tasks of a direction.
    stats = tasks.mixture_stats(mix, setup["spm"], token_sample=20)
    assert sorted(s["direction"] for s in stats) == [
        "de-en distilled", "de-en reference", "en-de distilled", "en-de reference"]
    from jaxmt.data import mixture as mixlib
    table = mixlib.rate_table(stats, 8.0, 10)
    assert "en-de distilled" in mixlib.format_table(table)
    assert sum(r["rate"] for r in table["directions"]) == pytest.approx(1.0)

    # Directions the directory lacks are named; no directory at all says what to run.
    with pytest.raises(ValueError, match="no distilled data for en-fr, fr-en"):
        tasks.register_from_config(_data_cfg(uninterrupted, 1.0, ("en", "de", "fr")),
                                   setup["spm"])
    with pytest.raises(ValueError, match="no such directory; write the distilled corpus "
                                         "first with `jaxmt distill translate"):
        tasks.register_from_config(_data_cfg(tmp_path / "none", 1.0), setup["spm"])


def test_data_mixture_and_cache_on_distilled_data(setup, uninterrupted, tmp_path, capsys):
    pytest.importorskip("seqio")
    from jaxmt.data import cache, pipeline, tasks

    assert _main(["data", "mixture", f"--gin_file={setup['gin']}", f"--vocab={setup['spm']}",
                     f"--gin.DataConfig.distilled='{uninterrupted}'",
                     "--gin.DataConfig.distilled_rate=0.25", "--steps=10", "--batch_size=4",
                     "--examples_per_row=1", "--token_sample=20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["direction"]: r for r in out["directions"]}
    assert rows["en-de distilled"]["task"] == "jaxmt_distilled_en_de"
    assert rows["en-de reference"]["task"] == "jaxmt_bible_en_de"
    assert rows["en-de distilled"]["rate"] == pytest.approx(
        rows["en-de reference"]["rate"] / 3)
    # `jaxmt data cache` caches every Task of the mixture; training then reads it.
    mix = tasks.register_from_config(_data_cfg(uninterrupted, 1.0), setup["spm"])
    built = cache.build(tmp_path / "cache", mix, setup["spm"], num_shards=1, progress=False)
    assert sorted(r["task"] for r in built) == ["jaxmt_distilled_de_en", "jaxmt_distilled_en_de"]
    assert cache.is_usable(tmp_path / "cache", mix, setup["spm"])
    _check_routing(pipeline.train_batches(mix, 32, 32, 8, seed=0, batching="pad", threads=1,
                                          cache_dir=str(tmp_path / "cache"), route=_route),
                   setup["spm"])  # the cache path routes by each Task's direction


@pytest.mark.slow
def test_a_few_training_steps_on_distilled_data(setup, uninterrupted, tmp_path):
    pytest.importorskip("seqio")
    from jaxmt.train.run import train

    model_dir = tmp_path / "student"
    model_dir.mkdir()
    shutil.copyfile(setup["spm"], model_dir / cfglib.VOCAB_FILE)
    last = train(str(model_dir), model_cfg=TINY, mesh_cfg=cfglib.MeshConfig(data=-1),
                 data_cfg=_data_cfg(uninterrupted, 1.0),
                 train_cfg=cfglib.TrainConfig(steps=2, batch_size=8, warmup_steps=1,
                                              checkpoint_every=2, log_every=1),
                 progress=False)
    assert np.isfinite(last["loss"])
    assert (model_dir / f"{distilled.REPORT_STEM}.txt").read_text().startswith(
        "distilled en-de/train: kept")
