"""Decoding speed: jaxmt against Hugging Face `generate` and CTranslate2, same model, same work.

One randomly initialised MarianMT model with jaxmt's ``tiny`` shape (d_model 256, 4
heads x 64, feed-forward 768, 3+3 layers, 8,192 pieces; SiLU, sinusoidal positions,
final logits bias) is written with ``save_pretrained`` into a temporary folder, with a
small SentencePiece model and an opus-mt style ``vocab.json`` (``</s>`` 0, ``<unk>`` 1,
``<pad>`` last, as CTranslate2's Marian converter needs). From those same weights:

* **jaxmt** imports it (``jaxmt.inference.hf_import.import_checkpoint``, fp32) and
  decodes with ``EncoderDecoderModel.predict_batch_with_aux`` (``DecodeConfig``);
* **hf**: ``MarianMTModel.generate`` (PyTorch, fp32, CPU, KV cache);
* **ct2_fp32** and **ct2_int8**: CTranslate2's ``Translator`` on the models
  ``ctranslate2.converters.TransformersConverter`` writes without and with
  ``quantization="int8"`` (``pip install -e '.[bench]'``; skipped, with the reason
  printed, where ``ctranslate2`` is not installed).

Same work everywhere: the same ``--batch`` sources of ``--src_len`` random ids (the last
one EOS, no padding), and exactly ``--new_tokens`` decoder steps, greedy and beam
``--beam`` (length penalty ``len ** 1``, as CTranslate2's default; canonical stopping).
Each output is ``new_tokens`` tokens with EOS allowed only as the last one: Hugging
Face ``min_new_tokens = new_tokens - 1, max_new_tokens = new_tokens``; CTranslate2
``min_decoding_length`` / ``max_decoding_length`` the same (neither counts the EOS);
jaxmt ``min_len = max_len_b = new_tokens`` (its lengths count the EOS). Marian's
``<pad>`` is never generated: CTranslate2 drops it from the vocabulary, Hugging Face
bans it (``bad_words_ids``), jaxmt through ``DecodeConfig.suppressed_ids``.

tokens/s = batch x new_tokens / seconds of one call (the best hypothesis per source for
beam search), best of ``--repeats`` calls after an untimed first call (which compiles
for jaxmt: ``jaxmt_compile_s`` is that call's time less the best one's).

Each engine runs in its own subprocess, one after the other, pinned to the first
``--threads`` cores this process may use (``sched_setaffinity``, before any thread pool
starts) with ``--threads`` threads: ``torch.set_num_threads``, CTranslate2
``intra_threads`` (``inter_threads`` 1). XLA has no working thread-count flag in jax
0.10.2: ``--xla_cpu_multi_thread_eigen=false`` still leaves YNNPACK's matmuls on every
core; the affinity is what limits it (measured: one busy thread under a 1-core affinity,
two without). One thread per engine, the default, is the per-core comparison, the one
other processes on the machine disturb least: multi-threaded OpenMP pools (torch,
CTranslate2) slow down many times when a core is taken. ``tokens_per_cpu_s`` (the best
call's process CPU time) is the figure to trust on a busy machine; the table warns when
the load average says other processes ran.

Agreement is checked on the outputs of the untimed first calls: greedy ids of jaxmt,
Hugging Face and CTranslate2 fp32 must be equal (fp32 everywhere, same weights), or the
script stops with the first difference (no JSON); beam search and int8 agreement (share
of identical outputs and of tokens) are reported.

``--isa`` as in ``benchmarks/train_step.py`` (its ``apply_isa`` and
``hide_avx512_from_jaxlib``, reused): ``avx2`` caps XLA's code at AVX2 and hides AVX-512
from jaxlib's YNNPACK, sets torch's ``ATEN_CPU_CAPABILITY``, and oneDNN's and MKL's caps
(CTranslate2's GEMMs go through them) plus ``CT2_FORCE_CPU_ISA=AVX2``. What CTranslate2
chose (its log: ISA, GEMM backends) is in ``info``; on AMD CPUs it picks AVX2 code
itself, with oneDNN GEMMs that still use AVX-512 under ``native``. ``both`` runs
every engine under each ISA; the top-level figures are then ``native``'s, and
``by_isa`` has both.

    python benchmarks/decode.py [--batch 32] [--src_len 64] [--new_tokens 64] [--beam 4]
        [--threads 1] [--repeats 3] [--isa native|avx2|both] [--engines jaxmt,hf,...]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# benchmarks/ is the script's folder; --isa as train_step.py sets it.
from train_step import ISA_ENV, apply_isa, hide_avx512_from_jaxlib

ENGINES = ("jaxmt", "hf", "ct2_fp32", "ct2_int8")
# jaxmt's tiny shape (gin_configs/models/tiny.gin) as a MarianConfig.
TINY_MARIAN = dict(vocab_size=8192, d_model=256, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=768, decoder_ffn_dim=768,
                   encoder_layers=3, decoder_layers=3)
SPM_PIECES = 1000  # the SentencePiece model's size; vocab.json is filled up to vocab_size
CT2_MISSING = "ctranslate2 is not installed (pip install -e '.[bench]')"
CT2_LOG_KEYS = ("Selected ISA", "SGEMM backend", "GEMM_S8 backend")


# ---------------------------------------------------------------------------- set-up

def build_model(model_dir: str, seed: int = 0) -> dict:
    """Writes the random MarianMT model and its tokenizer files; returns its vocab.json."""
    import torch
    import transformers

    from jaxmt.data.vocab import load_processor, train_vocab

    spm_path = os.path.join(model_dir, "source.spm")
    train_vocab(spm_path, ["en"], SPM_PIECES, sample_per_lang=300)
    with open(spm_path, "rb") as f, open(os.path.join(model_dir, "target.spm"), "wb") as g:
        g.write(f.read())
    sp = load_processor(spm_path)
    v = TINY_MARIAN["vocab_size"]
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(sp.get_piece_size()):
        if not (sp.is_control(i) or sp.is_unknown(i)):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    while len(vocab) < v - 1:  # pieces no text produces: the model's shape is what counts
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    vocab["<pad>"] = v - 1
    with open(os.path.join(model_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)

    torch.manual_seed(seed)
    cfg = transformers.MarianConfig(
        **TINY_MARIAN, decoder_vocab_size=v, activation_function="swish",
        scale_embedding=True, max_position_embeddings=512, pad_token_id=v - 1,
        eos_token_id=0, decoder_start_token_id=v - 1, forced_eos_token_id=None,
        init_std=0.1)  # larger than the default 0.02: fewer near-ties between argmaxes
    model = transformers.MarianMTModel(cfg).eval()
    gc = model.generation_config
    gc.forced_eos_token_id = gc.forced_bos_token_id = None
    gc.bad_words_ids = [[v - 1]]  # as every opus-mt config: <pad> is never generated
    model.save_pretrained(model_dir)
    transformers.MarianTokenizer(spm_path, os.path.join(model_dir, "target.spm"),
                                 os.path.join(model_dir, "vocab.json")).save_pretrained(model_dir)
    return vocab


def convert_ct2(model_dir: str, out_dir: str, quantization: str | None) -> None:
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(model_dir).convert(out_dir, quantization=quantization, force=True)


def make_sources(batch: int, src_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """[batch, src_len] Marian ids: ordinary pieces (not </s> 0, <unk> 1, <pad>), EOS last."""
    rng = np.random.default_rng(seed)
    src = rng.integers(2, vocab_size - 1, (batch, src_len)).astype(np.int64)
    src[:, -1] = 0
    return src


# ---------------------------------------------------------------------------- engines
# Each returns {strategy: fn}; fn() decodes the sources and returns [batch, new_tokens]
# Marian ids, -1 after an EOS-ended output (the EOS itself dropped).

def _ended(rows, eos: int, n: int) -> np.ndarray:
    out = np.full((len(rows), n), -1, np.int64)
    for r, row in enumerate(rows):
        row = [int(t) for t in row][:n]
        if eos in row:
            row = row[:row.index(eos)]
        out[r, :len(row)] = row
    return out


def jaxmt_engine(a, d: str, src: np.ndarray) -> tuple[dict, dict]:
    import jax

    from jaxmt.config import DecodeConfig
    from jaxmt.inference.hf_import import import_checkpoint
    from jaxmt.inference.tokenizer import id_permutation
    from jaxmt.modeling.model import EncoderDecoderModel

    hidden = hide_avx512_from_jaxlib() if a.isa == "avx2" else "not needed"
    imp = import_checkpoint(os.path.join(d, "hf"), precision="fp32")
    perm = id_permutation(imp.model.vocab_size, imp.tokenizer.reordered_ids)  # jaxmt -> Marian
    inv = np.argsort(perm)
    model = EncoderDecoderModel(imp.model)
    params = jax.device_put(imp.params)
    batch = {"encoder_input_tokens": jax.device_put(inv[src].astype(np.int32))}
    n = a.new_tokens
    common = dict(min_len=n, max_len_a=0.0, max_len_b=n, no_repeat_ngram_size=0,
                  length_penalty="power", alpha=1.0, early_stopping="never",
                  suppressed_ids=imp.tokenizer.suppressed_ids)
    configs = {"greedy": DecodeConfig(strategy="greedy", **common),
               f"beam{a.beam}": DecodeConfig(strategy="beam", beam_size=a.beam, **common)}

    def run(cfg):
        ids, _ = jax.block_until_ready(model.predict_batch_with_aux(params, batch, decode=cfg,
                                                                    max_decode_len=n))
        return ids

    def to_marian(ids):
        ids = np.asarray(ids)[:, 0]  # best hypothesis; jaxmt's EOS is 1, Marian's 0
        return _ended(perm[ids], 0, n)
    fns = {k: (lambda c=c: run(c)) for k, c in configs.items()}
    return fns, {"convert": to_marian, "info": {
        "jaxmt_precision": imp.model.precision, "jaxlib_avx512_hidden": hidden,
        "jax": jax.__version__, "jax_platform": jax.devices()[0].platform}}


def hf_engine(a, d: str, src: np.ndarray) -> tuple[dict, dict]:
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    model = transformers.MarianMTModel.from_pretrained(os.path.join(d, "hf")).eval()
    cfg = model.config
    inputs = {"input_ids": torch.from_numpy(src), "attention_mask": torch.ones(src.shape,
                                                                             dtype=torch.long)}
    n = a.new_tokens

    def gen(beams):
        gc = transformers.GenerationConfig(
            do_sample=False, num_beams=beams, min_new_tokens=n - 1, max_new_tokens=n,
            length_penalty=1.0, early_stopping="never" if beams > 1 else False,
            no_repeat_ngram_size=0, bad_words_ids=[[cfg.pad_token_id]],
            decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id, use_cache=True)
        with torch.inference_mode():
            return model.generate(**inputs, generation_config=gc)
    fns = {"greedy": lambda: gen(1), f"beam{a.beam}": lambda: gen(a.beam)}
    return fns, {"convert": lambda out: _ended(out.numpy()[:, 1:], 0, n), "info": {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}}


def ct2_engine(a, d: str, src: np.ndarray, quantized: bool) -> tuple[dict, dict]:
    import ctranslate2

    path = os.path.join(d, "ct2_int8" if quantized else "ct2_fp32")
    translator = ctranslate2.Translator(path, device="cpu",
                                        compute_type="int8" if quantized else "float32",
                                        intra_threads=a.threads, inter_threads=1)
    with open(os.path.join(path, "shared_vocabulary.json"), encoding="utf-8") as f:
        tokens = json.load(f)
    index = {t: i for i, t in enumerate(tokens)}
    sources = [[tokens[i] for i in row] for row in src.tolist()]
    n = a.new_tokens

    def run(beams):
        return translator.translate_batch(
            sources, beam_size=beams, length_penalty=1.0, min_decoding_length=n - 1,
            max_decoding_length=n, max_batch_size=0, return_end_token=True)

    def convert(results):
        return _ended([[index[t] for t in r.hypotheses[0]] for r in results], 0, n)
    fns = {"greedy": lambda: run(1), f"beam{a.beam}": lambda: run(a.beam)}
    return fns, {"convert": convert, "info": {
        "ctranslate2": ctranslate2.__version__, "ct2_compute_type": translator.compute_type,
        "ct2_threads": a.threads}}


def worker(a) -> None:
    """One engine in this process: first calls (outputs saved), then the timed calls."""
    d = a.workdir
    src = np.load(os.path.join(d, "sources.npy"))
    engine = a.worker
    if engine == "jaxmt":
        fns, extra = jaxmt_engine(a, d, src)
    elif engine == "hf":
        fns, extra = hf_engine(a, d, src)
    else:
        fns, extra = ct2_engine(a, d, src, quantized=engine == "ct2_int8")
    res = {"first_s": {}, "best_s": {}, "cpu_s": {}, "info": extra["info"]}
    for name, fn in fns.items():  # the untimed first calls, whose outputs are compared
        t = time.perf_counter()
        out = fn()
        res["first_s"][name] = time.perf_counter() - t
        np.save(os.path.join(d, f"{a.isa}_{engine}_{name}.npy"), extra["convert"](out))
    for name, fn in fns.items():
        best, cpu = float("inf"), float("inf")
        for _ in range(a.repeats):
            t, c = time.perf_counter(), time.process_time()
            fn()
            best = min(best, time.perf_counter() - t)
            cpu = min(cpu, time.process_time() - c)
        res["best_s"][name], res["cpu_s"][name] = best, cpu
    res["affinity"] = sorted(os.sched_getaffinity(0))
    print(json.dumps(res))


# ---------------------------------------------------------------------------- driver

def run_worker(a, engine: str, isa: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--workdir",
           a.workdir, "--isa", isa, "--threads", str(a.threads), "--repeats", str(a.repeats),
           "--new_tokens", str(a.new_tokens), "--beam", str(a.beam)]
    env = dict(os.environ, CT2_VERBOSE="1") if engine.startswith("ct2") else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {engine} (--isa {isa}) failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if engine.startswith("ct2"):  # what CTranslate2 chose, from its own log
        for line in proc.stderr.splitlines():
            for key in CT2_LOG_KEYS:
                if f"- {key}:" in line:
                    res["info"]["ct2_" + key.lower().replace(" ", "_")] = line.split(": ", 1)[1]
    return res


def agreement(x: np.ndarray, y: np.ndarray) -> dict:
    return {"outputs": round(float(np.mean(np.all(x == y, axis=1))), 4),
            "tokens": round(float(np.mean(x == y)), 4)}


def first_difference(x: np.ndarray, y: np.ndarray) -> str:
    r = int(np.argmax(~np.all(x == y, axis=1)))
    p = int(np.argmax(x[r] != y[r]))
    return f"row {r}, token {p}: {x[r, p:p + 5].tolist()} vs {y[r, p:p + 5].tolist()}"


def measure_isa(a, isa: str, engines: list[str], skipped: dict) -> dict:
    runs = {}
    for e in engines:
        print(f"  [{isa}] {e} ...", file=sys.stderr, flush=True)
        runs[e] = run_worker(a, e, isa)
    strategies = ("greedy", f"beam{a.beam}")
    tokens = a.batch * a.new_tokens
    out = {s: {e: (round(tokens / runs[e]["best_s"][s], 1) if e in runs else None)
               for e in ENGINES} for s in strategies}
    out["tokens_per_cpu_s"] = {s: {e: round(tokens / runs[e]["cpu_s"][s], 1)
                                   for e in runs} for s in strategies}
    for s in strategies:
        j = out[s]["jaxmt"]
        for e in ENGINES[1:]:
            out[f"ratio_vs_{e}_{s}"] = (round(j / out[s][e], 3)
                                        if j is not None and out[s][e] is not None else None)
    if "jaxmt" in runs:
        out["jaxmt_compile_s"] = {s: round(runs["jaxmt"]["first_s"][s]
                                           - runs["jaxmt"]["best_s"][s], 2) for s in strategies}
    ids = {(e, s): np.load(os.path.join(a.workdir, f"{isa}_{e}_{s}.npy"))
           for e in runs for s in strategies}
    agree, mismatch = {}, []
    pairs = [(x, y) for i, x in enumerate(ENGINES) for y in ENGINES[i + 1:]
             if x in runs and y in runs]
    for s in strategies:
        for x, y in pairs:
            agree[f"{s}_{x}_vs_{y}"] = agreement(ids[x, s], ids[y, s])
            if (s == "greedy" and "int8" not in x + y
                    and agree[f"{s}_{x}_vs_{y}"]["outputs"] < 1.0):
                mismatch.append(f"greedy {x} vs {y}: {first_difference(ids[x, s], ids[y, s])}")
    out["agreement"] = agree
    out["info"] = {e: {**r["info"], "cores": r["affinity"]} for e, r in runs.items()}
    out["skipped"] = skipped
    if mismatch:  # fp32 greedy decoding of the same weights must give the same ids
        raise SystemExit("error: greedy outputs differ (fp32, same weights):\n  "
                         + "\n  ".join(mismatch))
    return out


def print_table(a, isa: str, r: dict) -> None:
    strategies = ("greedy", f"beam{a.beam}")
    print(f"ISA {isa}: tokens/s (batch {a.batch} x {a.new_tokens} new tokens, "
          f"{a.threads} thread{'s' if a.threads > 1 else ''}, best of {a.repeats})")
    print(f"  {'engine':<16}" + "".join(f"{s:>12}" for s in strategies))
    for e in ENGINES:
        cells = "".join(f"{r[s][e]:>12,.0f}" if r[s][e] is not None else f"{'skipped':>12}"
                        for s in strategies)
        print(f"  {e:<16}{cells}")
    for e in ENGINES[1:]:
        cells = "".join(f"{r[f'ratio_vs_{e}_{s}']:>11.2f}x" if r[f"ratio_vs_{e}_{s}"]
                        is not None else f"{'-':>12}" for s in strategies)
        print(f"  {'jaxmt / ' + e:<16}{cells}")
    if "jaxmt_compile_s" in r:
        print("  jaxmt compile: " + ", ".join(f"{s} {t:.1f} s"
                                              for s, t in r["jaxmt_compile_s"].items()))
    for k, v in r["agreement"].items():
        print(f"  agreement {k}: {v['outputs']:.0%} of outputs, {v['tokens']:.1%} of tokens")
    for e, why in r["skipped"].items():
        print(f"  {e}: skipped, {why}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--src_len", type=int, default=64, help="source tokens, EOS included")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="threads (and cores) per engine")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--isa", default="native", choices=(*sorted(ISA_ENV), "both"))
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:  # before any library starts its thread pools
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[:a.threads])
        apply_isa(a.isa)
        if a.isa == "avx2":
            os.environ["CT2_FORCE_CPU_ISA"] = "AVX2"
        return worker(a)

    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= a.threads <= len(cores):
        raise SystemExit(f"error: --threads {a.threads}: this process may use {len(cores)} cores")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or "jaxmt" not in engines:
        raise SystemExit(f"error: --engines: jaxmt plus any of {ENGINES[1:]}, got {a.engines}")
    skipped = {}
    try:
        import ctranslate2
        ct2_version = ctranslate2.__version__
    except ImportError:
        ct2_version = None
        skipped.update({e: CT2_MISSING for e in engines if e.startswith("ct2")})
    engines = [e for e in engines if e not in skipped]
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="jaxmt_decode_bench_") as d:
        a.workdir = d
        os.makedirs(os.path.join(d, "hf"))
        t = time.perf_counter()
        vocab = build_model(os.path.join(d, "hf"))
        for e in engines:
            if e.startswith("ct2"):
                convert_ct2(os.path.join(d, "hf"), os.path.join(d, e),
                            "int8" if e == "ct2_int8" else None)
        np.save(os.path.join(d, "sources.npy"),
                make_sources(a.batch, a.src_len, len(vocab)))
        print(f"model and conversions: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        isas = sorted(ISA_ENV) if a.isa == "both" else [a.isa]
        by_isa = {isa: measure_isa(a, isa, engines, skipped) for isa in isas}

    import jax
    import transformers

    top = by_isa["native" if "native" in by_isa else isas[0]]
    res = {**top, "isa": a.isa if a.isa != "both" else "native",
           "model": {"arch": "marian", "shape": "tiny", **TINY_MARIAN,
                     "activation": "swish", "precision": "fp32"},
           "batch": a.batch, "src_len": a.src_len, "new_tokens": a.new_tokens,
           "beam": a.beam, "threads": a.threads, "repeats": a.repeats,
           "tokens_per_call": a.batch * a.new_tokens, "engines": engines,
           "jax": jax.__version__, "transformers": transformers.__version__,
           "ctranslate2": ct2_version, "cpu_count": os.cpu_count(),
           "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)}
    try:
        import torch
        res["torch"] = torch.__version__
    except ImportError:
        pass
    if a.isa == "both":
        res["by_isa"] = by_isa
    print(f"MarianMT, jaxmt's tiny shape, fp32; batch {a.batch}, {a.src_len}-token sources, "
          f"{a.new_tokens} new tokens; load average {res['loadavg_1m_end']}")
    for isa, r in by_isa.items():
        print_table(a, isa, r)
    if res["loadavg_1m_end"] > (os.cpu_count() or 1) - a.threads + 0.75:
        print("  warning: other processes were using the CPUs; these figures are unreliable")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
