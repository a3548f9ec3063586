"""The ``jaxmt`` command: train, eval, translate, convert, data validate, vocab.

    jaxmt train --gin_file=gin_configs/runs/demo.gin --gin.TRAIN_STEPS=100 --model_dir=runs/x
    jaxmt eval --model_dir=runs/x [--split=test] [--max_examples=N] [--json]
    jaxmt translate --model_dir=runs/x --src_lang=en --tgt_lang=de < in.txt > out.txt
    jaxmt convert --from_hf=opus-mt-en-de --out=runs/opus-en-de  # T5, mT5 or MarianMT
    jaxmt translate --model_dir=runs/opus-en-de < in.txt > out.txt
    jaxmt data validate --src_lang=en --tgt_lang=pt-BR corpus.tsv.gz [--json]
    jaxmt data mixture --gin_file=runs/demo.gin [--steps=N] [--model_dir=runs/x] [--json]
    jaxmt vocab train --out=v.model [--gin_file=RUN.gin | --langs=en,de --vocab_size=8000]
    jaxmt vocab report --vocab=v.model [--gin_file=RUN.gin | --langs=en,de] [--json]

Multi-host training runs the same `jaxmt train` on every host, with the same
--model_dir (a shared filesystem) and --coordinator_address=HOST0:PORT
--num_processes=N --process_id=I (or JAX_* variables; SLURM and Cloud TPU are detected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxmt.gin_files import parse_gin  # imports gin and the configs, no JAX
from jaxmt.sharding.multihost import CLUSTER_DETECTION  # imports jax only when initialising

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

def cmd_train(args, gin_overrides) -> int:
    from jaxmt.sharding import multihost

    # Before gin (whose imports may build configs) and before anything touches devices.
    try:
        where = multihost.initialize(args.coordinator_address, args.num_processes,
                                     args.process_id, args.cluster_detection)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"jax.distributed: {where}", flush=True)
    parse_gin(args.gin_file or [], gin_overrides)
    from jaxmt.train.run import train

    t0 = time.time()
    train(model_dir=args.model_dir)
    print(f"train finished in {time.time() - t0:.0f}s; model directory {args.model_dir}",
          flush=True)
    return 0


def _inference_options(args) -> dict:
    """Translator keywords from --max_len / --attention (long inputs at inference)."""
    from jaxmt.config import AttentionConfig

    opts = {}
    if args.max_len:
        opts.update(max_src_len=args.max_len, max_decode_len=args.max_len)
    if args.attention:
        opts["attention"] = AttentionConfig(encoder=args.attention)
    return opts


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_len", type=int, default=None,
                   help="source and output token limit (default: DataConfig.max_eval_len)")
    p.add_argument("--attention", default=None,
                   help="encoder attention implementation for long inputs, e.g. auto, local, "
                        "flash (AttentionConfig.encoder; default: the trained setting)")


def cmd_eval(args) -> int:
    from jaxmt import config as cfglib
    from jaxmt.inference.evaluation import evaluate, format_table
    from jaxmt.inference.translator import Translator

    cfgs = cfglib.load(args.model_dir)
    if "data" not in cfgs:
        raise SystemExit(f"error: {args.model_dir}: no data section (an imported model); "
                         "`jaxmt eval` scores the directions a model was trained on")
    tr = Translator.from_pretrained(args.model_dir, **_inference_options(args))
    data_cfg = cfgs["data"]
    log = lambda d, r: print(f"{d}: BLEU {r['bleu']:.1f} chrF {r['chrf']:.1f} (n={r['n']})",
                             file=sys.stderr, flush=True)
    result = evaluate(tr, data_cfg.directions, split=args.split, max_examples=args.max_examples,
                      progress=log, corpus=data_cfg.corpora, limits=data_cfg.clean)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def cmd_translate(args) -> int:
    from jaxmt.fileio import write_atomic
    from jaxmt.inference.translator import Translator, translate_stream

    tr = Translator.from_pretrained(args.model_dir, **_inference_options(args))
    data = Path(args.input).read_bytes() if args.input else sys.stdin.buffer.read()
    out = translate_stream(tr, data, args.src_lang, args.tgt_lang)
    if args.output:
        write_atomic(args.output, out)
    else:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    return 0


def cmd_convert(args) -> int:
    from jaxmt.inference.hf_import import convert

    imported = convert(args.from_hf, args.out, precision=args.precision,
                       scan_layers=args.scan_layers, input_prefix=args.input_prefix)
    m, tok = imported.model, imported.tokenizer
    print(f"converted {args.from_hf} -> {args.out}: {tok.kind}, vocab {m.vocab_size}, "
          f"{m.num_encoder_layers}+{m.num_decoder_layers} layers, d_model {m.emb_dim}, "
          f"input prefix {tok.input_prefix!r}", flush=True)
    return 0


def cmd_data_validate(args) -> int:
    # Pure Python (no seqio/TensorFlow): starts in a fraction of a second.
    from jaxmt.data import sources

    try:
        source = sources.CorpusSource(args.file, args.src_lang, args.tgt_lang,
                                      format=args.format, tgt_path=args.tgt_file)
        limits = sources.CleanConfig(
            max_chars=args.max_chars, max_length_ratio=args.max_length_ratio or None,
            ratio_min_chars=args.ratio_min_chars, dedup=not args.no_dedup,
            strict=args.strict, max_examples=args.max_examples)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    report = sources.Report(source.name, max_examples=limits.max_examples)
    error = None
    try:
        for _ in sources.read_pairs(source, limits, report):
            pass
    except sources.BadRecordError as e:
        error = str(e)
    except (OSError, ValueError) as e:  # a missing or unreadable file
        raise SystemExit(f"error: {e}") from None
    if args.report_dir:
        sources.write_reports(args.report_dir, [report])
    if args.json:
        out = {"file": source.path, "tgt_file": source.tgt_path,
               "format": source.resolved_format, "src_lang": source.src_lang,
               "tgt_lang": source.tgt_lang, "total": report.total, "kept": report.kept,
               "skipped": report.skipped}
        if error:
            out["error"] = error
        print(json.dumps(out, ensure_ascii=False), flush=True)
    else:
        print(report.format_text(), flush=True)
    if error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def _packed_examples_per_row(mixture: str, data_cfg, seed: int, rows: int) -> float:
    """Mean examples per packed row over the first ``rows`` rows the trainer would get."""
    from jaxmt.data import pipeline

    it = pipeline.train_batches(mixture, data_cfg.src_len, data_cfg.tgt_len, min(rows, 32),
                                seed=seed, batching="pack")
    counts: list[int] = []
    while len(counts) < rows:
        counts += [int(r.max()) for r in next(it)["decoder_segment_ids"]]
    return sum(counts[:rows]) / rows


def _bucketed_examples_per_row(mixture: str, data_cfg, train_cfg) -> float:
    """Examples per step of the bucket schedule the trainer would use, per batch row
    (one example per row; the short buckets have more rows). Ignores the mesh's rounding."""
    from jaxmt.data import bucketing, pipeline

    max_len = max(data_cfg.src_len, data_cfg.tgt_len)
    shapes = bucketing.bucket_shapes(data_cfg.bucket_lengths, train_cfg.batch_size, max_len)
    lengths = pipeline.sample_lengths(mixture, data_cfg.src_len, data_cfg.tgt_len,
                                      train_cfg.seed)
    weights = bucketing.schedule_weights(lengths, shapes, margin=pipeline.BUCKETING["margin"],
                                         min_share=pipeline.BUCKETING["min_share"])
    return bucketing.expected_rows(shapes, weights) / train_cfg.batch_size


def _data_configs(args, gin_overrides):
    """The run's DataConfig and TrainConfig from --gin_file/--gin.*; a bad one exits."""
    parse_gin(args.gin_file or [], gin_overrides)
    from jaxmt import config as cfglib

    try:
        return cfglib.DataConfig(), cfglib.TrainConfig()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_data_mixture(args, gin_overrides) -> int:
    import tempfile

    data_cfg, train_cfg = _data_configs(args, gin_overrides)
    from jaxmt import config as cfglib
    from jaxmt.data import mixture as mixlib
    from jaxmt.data import tasks, vocab

    steps = args.steps if args.steps is not None else train_cfg.steps
    batch_size = args.batch_size if args.batch_size is not None else train_cfg.batch_size
    if steps <= 0 or batch_size <= 0 or args.pack_rows <= 0:
        raise SystemExit("error: --steps, --batch_size and --pack_rows must be positive")
    with tempfile.TemporaryDirectory(prefix="jaxmt_mixture_") as tmp:
        if args.vocab:
            spm_path = args.vocab
        elif args.model_dir:
            spm_path = os.path.join(args.model_dir, cfglib.VOCAB_FILE)
        else:  # the vocabulary `jaxmt train` would make for this config
            spm_path = os.path.join(tmp, cfglib.VOCAB_FILE)
            print(f"training a {data_cfg.vocab_size}-piece SentencePiece vocabulary as "
                  "`jaxmt train` would (pass --vocab or --model_dir to reuse one)",
                  file=sys.stderr, flush=True)
            vocab.train_for_config(spm_path, data_cfg, train_cfg.seed)
        if not os.path.exists(spm_path):
            raise SystemExit(f"error: {spm_path}: no SentencePiece model there")
        try:
            mixture = tasks.register_from_config(data_cfg, spm_path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        stats = tasks.mixture_stats(mixture, spm_path, token_sample=args.token_sample)
        if args.examples_per_row is not None:
            per_row, how = args.examples_per_row, "--examples_per_row"
        elif data_cfg.batching == "pad":
            per_row, how = 1.0, "unpacked: DataConfig.batching='pad'"
        elif data_cfg.batching == "bucket":
            per_row = _bucketed_examples_per_row(mixture, data_cfg, train_cfg)
            how = "bucketed: mean rows per step of the bucket schedule / batch_size"
        else:
            per_row = _packed_examples_per_row(mixture, data_cfg, train_cfg.seed, args.pack_rows)
            how = f"mean of {args.pack_rows} packed rows of the training pipeline"
    table = mixlib.rate_table(stats, batch_size * per_row, steps)
    if args.json:
        task_of = {(s["src"], s["tgt"]): s["task"] for s in stats}
        for row in table["directions"]:
            row["task"] = task_of[(row["src"], row["tgt"])]
        print(json.dumps({
            "mixture": mixture, "temperature": data_cfg.temperature,
            "mixture_cap": data_cfg.mixture_cap, "mixture_caps": data_cfg.mixture_caps,
            "mixture_weights": data_cfg.mixture_weights, "batch_size": batch_size,
            "examples_per_row": per_row, "examples_per_row_from": how,
            "token_sample": args.token_sample, **table}, ensure_ascii=False), flush=True)
        return 0
    tokens = ("tokens of every train pair" if not args.token_sample else
              f"tokens estimated from every k-th pair (~{args.token_sample} per direction)")
    print(f"{mixture}: temperature {data_cfg.temperature:g}, mixture_cap "
          f"{data_cfg.mixture_cap or 'none'}, mixture_caps {data_cfg.mixture_caps or 'none'}, "
          f"mixture_weights {data_cfg.mixture_weights or 'none'}")
    print(f"budget: {steps:,} steps x {batch_size} rows x {per_row:.2f} examples/row ({how}) "
          f"= {table['sampled']:,.0f} examples")
    print(f"{tokens}: tagged source + target, EOS included, before trimming to "
          f"{data_cfg.src_len}/{data_cfg.tgt_len}; a language's rate is its share of the "
          "sampled sentences (two per example)")
    print()
    print(mixlib.format_table(table), flush=True)
    return 0


def cmd_data_cache(args, gin_overrides) -> int:
    """`jaxmt data cache`: tokenise the run's train mixture once (jaxmt/data/cache.py)."""
    data_cfg, train_cfg = _data_configs(args, gin_overrides)
    from jaxmt import config as cfglib
    from jaxmt.data import cache, tasks, vocab

    if args.num_shards <= 0:
        raise SystemExit("error: --num_shards must be positive")
    cache_dir = args.cache_dir or data_cfg.cache_dir or (
        args.model_dir and os.path.join(args.model_dir, cfglib.CACHE_DIR))
    if not cache_dir:
        raise SystemExit("error: where should the cache go? Pass --model_dir (the cache goes "
                         "to MODEL_DIR/data_cache, where `jaxmt train` looks), --cache_dir, or "
                         "set DataConfig.cache_dir")
    spm_path = args.vocab or (args.model_dir and os.path.join(args.model_dir, cfglib.VOCAB_FILE))
    if not spm_path:
        raise SystemExit("error: pass --model_dir (its spm.model, trained there as `jaxmt "
                         "train` would if missing) or --vocab")
    if not os.path.exists(spm_path):
        if args.vocab:
            raise SystemExit(f"error: {spm_path}: no SentencePiece model there")
        print(f"training a {data_cfg.vocab_size}-piece SentencePiece vocabulary as `jaxmt "
              f"train` would -> {spm_path}", file=sys.stderr, flush=True)
        os.makedirs(args.model_dir, exist_ok=True)
        vocab.train_for_config(spm_path, data_cfg, train_cfg.seed)
    try:
        mixture = tasks.register_from_config(data_cfg, spm_path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.time()
    rows = cache.build(cache_dir, mixture, spm_path, num_shards=args.num_shards,
                       seed=train_cfg.seed, overwrite=args.overwrite, progress=not args.json)
    seconds = time.time() - t0
    if args.json:
        print(json.dumps({"cache_dir": cache_dir, "mixture": mixture, "seconds": seconds,
                          "tasks": rows}), flush=True)
        return 0
    print(cache.summary(rows))
    print(f"{sum(r['examples'] for r in rows):,} examples in {len(rows)} tasks, "
          f"{args.num_shards} files each, in {cache_dir} ({seconds:.1f}s); `jaxmt train` "
          f"with the same config{' and --model_dir' if args.model_dir else ''} reads it",
          flush=True)
    return 0


def _add_data_parser(sub) -> None:
    from jaxmt.data.sources import REASONS, CleanConfig

    defaults = CleanConfig()
    d = sub.add_parser("data", help="check parallel corpora (no training)")
    dsub = d.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser(
        "validate", help="run the training-time bad-input checks on one corpus",
        description="Reads FILE with the checks `jaxmt train` applies and reports, per "
        f"reason ({', '.join(REASONS)}), how many lines would be skipped, with the first "
        "ones as file:line. Exit status 0 unless --strict meets a bad line (then 1).")
    v.add_argument("file", help="TSV (src<TAB>tgt), JSONL ({\"src\":..,\"tgt\":..}) or, with "
                   "--tgt_file, the source-side text file; .gz is read transparently")
    v.add_argument("--src_lang", required=True, help="BCP-47 style code, e.g. en, pt-BR")
    v.add_argument("--tgt_lang", required=True, help="e.g. de, zh-Hans, es-419")
    v.add_argument("--tgt_file", default=None, help="target-side text file, aligned line "
                   "by line with FILE")
    v.add_argument("--format", default="auto", choices=("auto", "tsv", "jsonl", "text"),
                   help="default: from the suffix (.tsv, .jsonl, optionally .gz)")
    v.add_argument("--strict", action="store_true", help="stop with an error at the first "
                   "bad line instead of counting it")
    v.add_argument("--no_dedup", action="store_true", help="keep exact duplicate pairs")
    v.add_argument("--max_chars", type=int, default=defaults.max_chars,
                   help="longest side kept, in characters (default %(default)s)")
    v.add_argument("--max_length_ratio", type=float, default=defaults.max_length_ratio,
                   help="longer/shorter side length limit; 0 disables (default %(default)s)")
    v.add_argument("--ratio_min_chars", type=int, default=defaults.ratio_min_chars,
                   help="check the ratio only when both sides are at least this long "
                   "(default %(default)s)")
    v.add_argument("--max_examples", type=int, default=defaults.max_examples,
                   help="skipped lines quoted per reason (default %(default)s)")
    v.add_argument("--report_dir", default=None, help="also write data_report.json and "
                   "data_report.txt there")
    v.add_argument("--json", action="store_true", help="print one JSON object (the last "
                   "line): file, total, kept, skipped (count by reason)")
    m = dsub.add_parser(
        "mixture", help="print the mixture's rate table for a gin config",
        description="Registers the config's tasks as `jaxmt train` would and prints, per "
        "direction and per language: train examples, SentencePiece tokens, the sampling rate "
        "(DataConfig.temperature, mixture_cap, mixture_caps, mixture_weights), the examples "
        "sampled in --steps and the epochs that makes. Accepts --gin.NAME=VALUE overrides.")
    m.add_argument("--gin_file", action="append", help="gin file; repeatable")
    m.add_argument("--steps", type=int, default=None, help="step budget (default: "
                   "TrainConfig.steps)")
    m.add_argument("--batch_size", type=int, default=None, help="global batch in rows "
                   "(default: TrainConfig.batch_size)")
    m.add_argument("--vocab", default=None, help="SentencePiece model to count tokens with")
    m.add_argument("--model_dir", default=None, help="use MODEL_DIR/spm.model (without "
                   "--vocab or --model_dir, a vocabulary is trained as `jaxmt train` would)")
    m.add_argument("--examples_per_row", type=float, default=None, help="examples per "
                   "batch row (default: measured by packing --pack_rows rows; 1 unpacked)")
    m.add_argument("--pack_rows", type=int, default=256, help="rows packed to measure "
                   "examples per row (default %(default)s)")
    m.add_argument("--token_sample", type=int, default=0, help="tokenise about this many "
                   "pairs per direction (every k-th) and scale up; 0 = all (default)")
    m.add_argument("--json", action="store_true", help="print one JSON object (the last line)")
    c = dsub.add_parser(
        "cache", help="tokenise the run's train data once, into sharded files",
        description="Tokenises every direction of the run's mixture once and writes it in "
        "seqio's cache format (TFRecord shards). `jaxmt train` reads it when it is fresh "
        "(same vocabulary and examples); a stale cache is an error. Accepts "
        "--gin.NAME=VALUE overrides.")
    c.add_argument("--gin_file", action="append", help="gin file; repeatable")
    c.add_argument("--model_dir", default=None, help="the run's model directory: its "
                   "spm.model (trained there if missing) and MODEL_DIR/data_cache")
    c.add_argument("--vocab", default=None, help="SentencePiece model (instead of "
                   "MODEL_DIR/spm.model)")
    c.add_argument("--cache_dir", default=None, help="where to write (default: "
                   "DataConfig.cache_dir, else MODEL_DIR/data_cache)")
    c.add_argument("--num_shards", type=int, default=16, help="files per direction; a "
                   "multi-host run gives each host its own files when this is at least the "
                   "number of hosts (default %(default)s)")
    c.add_argument("--overwrite", action="store_true", help="rebuild fresh caches too")
    c.add_argument("--json", action="store_true", help="print one JSON object (the last line)")


# ---------------------------------------------------------------- jaxmt vocab

def _vocab_settings(args, gin_overrides) -> dict:
    """Languages, corpora and sizes for `jaxmt vocab`: the run's config, then the flags.

    The config is a model directory's (``--model_dir``, report only), the gin files'
    (``--gin_file``/``--gin.NAME=VALUE``) or, with neither, DataConfig's defaults.
    ``--corpus`` replaces the config's corpora; ``--langs`` its languages.
    """
    from jaxmt import config as cfglib
    from jaxmt.data import embedded, sources

    model_dir = getattr(args, "model_dir", None)
    if model_dir and (args.gin_file or gin_overrides):
        raise SystemExit("error: --model_dir and --gin_file/--gin.* are alternatives")
    try:
        if model_dir:
            cfgs = cfglib.load(model_dir)
            if "data" not in cfgs:
                raise SystemExit(f"error: {model_dir}: no data section (an imported "
                                 "model); pass --vocab and --langs instead")
            seed = cfgs["train"].seed if "train" in cfgs else 0
            data, configured = cfgs["data"], True
        else:
            if args.gin_file or gin_overrides:
                parse_gin(args.gin_file or [], gin_overrides, configs_only=True)
            data, seed = cfglib.DataConfig(), cfglib.TrainConfig().seed
            configured = bool(args.gin_file or gin_overrides)
        corpus = data.corpora
        if args.corpus:
            corpus = tuple(_corpus_flag(c, getattr(args, "split", "train"))
                           for c in args.corpus)
        langs = data.corpus_langs
        if args.corpus:
            langs = tuple(dict.fromkeys(x for s in corpus for x in (s.src_lang, s.tgt_lang)))
        elif not configured and args.command_vocab == "report":
            langs = embedded.EMBEDDED_LANGS  # a bare vocabulary: how it does on all eight
        if args.langs:
            langs = tuple(x.strip() for x in args.langs.split(",") if x.strip())
            for lang in langs:
                sources.check_lang_code(lang)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return {"langs": langs, "corpus": corpus, "limits": data.clean, "seed": seed,
            "vocab_size": data.vocab_size, "sample_per_lang": data.vocab_sample_per_lang}


def _corpus_flag(text: str, split: str):
    from jaxmt.data import sources

    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--corpus {text!r}: expected PATH:SRC_LANG:TGT_LANG, e.g. "
                         "data/en-pt.tsv.gz:en:pt-BR")
    return sources.CorpusSource(parts[0], parts[1], parts[2], split=split)


def cmd_vocab_train(args, gin_overrides) -> int:
    # Pure Python plus sentencepiece: no JAX, no TensorFlow.
    from jaxmt.data import vocab

    s = _vocab_settings(args, gin_overrides)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it")
    vocab_size = args.vocab_size or s["vocab_size"]
    per_lang = args.sample_per_lang or s["sample_per_lang"]
    seed = s["seed"] if args.seed is None else args.seed
    where = (f"{len(s['corpus'])} corpus file(s)" if s["corpus"] else "the embedded corpus")
    print(f"training {vocab_size} pieces on up to {per_lang} sentences per language of "
          f"{', '.join(s['langs'])} from {where} (seed {seed}) -> {out}", flush=True)
    t0 = time.time()
    try:
        vocab.train_vocab(out, s["langs"], vocab_size, per_lang, seed=seed,
                          corpus=s["corpus"], limits=s["limits"],
                          character_coverage=args.character_coverage)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} in {time.time() - t0:.1f}s; check it with "
          f"`jaxmt vocab report --vocab={out} --langs={','.join(s['langs'])}`", flush=True)
    return 0


def _report_texts(langs, corpus, split: str, limits, max_sentences: int) -> dict:
    """Held-out text per language: the corpora's ``split`` files, else the embedded split."""
    from jaxmt.data import embedded, sources

    if not corpus:
        _, texts = embedded.load_split(split, langs)
        return {lang: [t for t in texts[lang] if t][:max_sentences] for lang in langs}
    chosen = [c for c in corpus if c.split == split]
    if not chosen:
        have = sorted({c.split for c in corpus})
        raise ValueError(f"no {split!r} corpus among {[c.name for c in corpus]}; "
                         f"choose --split from {have}")
    texts: dict = {lang: {} for lang in langs}  # dicts as ordered sets
    for c in chosen:
        if c.src_lang not in texts and c.tgt_lang not in texts:
            continue
        for pair in sources.read_pairs(c, limits):
            for lang, t in zip((c.src_lang, c.tgt_lang), pair):
                if lang in texts and len(texts[lang]) < max_sentences:
                    texts[lang][t] = None
            if all(len(v) >= max_sentences for v in texts.values()):
                break
    return {lang: list(v) for lang, v in texts.items()}


def cmd_vocab_report(args, gin_overrides) -> int:
    from jaxmt import config as cfglib
    from jaxmt.data import vocab

    s = _vocab_settings(args, gin_overrides)
    path = args.vocab or (os.path.join(args.model_dir, cfglib.VOCAB_FILE)
                          if args.model_dir else None)
    if not path:
        raise SystemExit("error: pass --vocab=PATH (a .model file) or --model_dir")
    try:
        texts = _report_texts(s["langs"], s["corpus"], args.split, s["limits"],
                              args.max_sentences)
        result = vocab.report(path, texts)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    result["split"] = args.split
    result["text"] = [c.path for c in s["corpus"] if c.split == args.split] or "embedded"
    if args.json:
        print(json.dumps(result, ensure_ascii=False), flush=True)
    else:
        print(f"text: the {args.split} split of the embedded corpus"
              if result["text"] == "embedded" else f"text: {', '.join(result['text'])}")
        print(vocab.format_report(result), flush=True)
    return 0


def _add_vocab_parser(sub) -> None:
    from jaxmt.config import DataConfig

    defaults = DataConfig()
    v = sub.add_parser("vocab", help="train or measure a SentencePiece vocabulary")
    vsub = v.add_subparsers(dest="command_vocab", required=True)
    config_help = ("The languages, corpora (DataConfig.corpora, read with the checks of "
                   "DataConfig.clean) and sizes come from --gin_file/--gin.NAME=VALUE "
                   "(the run's DataConfig) or DataConfig's defaults; the flags override them.")
    t = vsub.add_parser(
        "train", help="train a balanced SentencePiece model (byte fallback, language tags)",
        description="Trains the shared unigram SentencePiece model `jaxmt train` would: "
        "a language-balanced sample of the train split, byte fallback (nothing is UNK), "
        "and a one-piece tag <2xx> for every embedded language and every language "
        "trained on. " + config_help)
    r = vsub.add_parser(
        "report", help="per-language UNK rate, fertility and round trip of a vocabulary",
        description="Encodes held-out text (the embedded corpus's --split, or the "
        "corpora's files of that split) and prints per language: sentences, words, "
        "pieces, fertility (pieces per whitespace word; not comparable for scripts "
        "without spaces), UNK rate (must be 0), byte-fallback rate, round-trip "
        "exactness after the model's normalisation and against the raw text, and the "
        "tag id; then warnings, e.g. a language with more than 2x the median fertility. "
        "Without a config or --langs it reports on all eight embedded languages. "
        + config_help)
    for p in (t, r):
        p.add_argument("--gin_file", action="append", help="gin file (e.g. the run's); "
                       "repeatable; --gin.NAME=VALUE overrides apply")
        p.add_argument("--langs", default=None, help="comma-separated codes, e.g. "
                       "en,de,pt-BR (default: the config's languages)")
        p.add_argument("--corpus", action="append", metavar="PATH:SRC:TGT",
                       help="a parallel corpus file (TSV/JSONL, .gz ok) and its two "
                       "languages, e.g. data/en-pt.tsv.gz:en:pt-BR; repeatable; replaces "
                       "the config's corpora")
    t.add_argument("--out", required=True, help="the .model file to write")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t.add_argument("--vocab_size", type=int, default=None,
                   help=f"pieces (default: DataConfig.vocab_size, {defaults.vocab_size})")
    t.add_argument("--sample_per_lang", type=int, default=None, help="sentences per "
                   "language (default: DataConfig.vocab_sample_per_lang, "
                   f"{defaults.vocab_sample_per_lang})")
    t.add_argument("--character_coverage", type=float, default=0.9995,
                   help="share of characters with their own pieces; the rest are byte "
                   "pieces (default %(default)s; lower for large character sets)")
    t.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: TrainConfig.seed)")
    r.add_argument("--vocab", default=None, help="the .model file to measure")
    r.add_argument("--model_dir", default=None, help="a jaxmt model directory: its "
                   "spm.model, languages and corpora (instead of --vocab/--gin_file)")
    r.add_argument("--split", default="validation", help="held-out split to encode "
                   "(default %(default)s)")
    r.add_argument("--max_sentences", type=int, default=10000,
                   help="first N sentences per language (default %(default)s)")
    r.add_argument("--json", action="store_true", help="print one JSON object (the last "
                   "line) instead of the table")


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process", "Run the same command once per process (host). Unset flags fall back "
        "to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; with none of them "
        "set, SLURM job steps (srun) and multi-host Cloud TPUs are detected, else the run is "
        "a single process. See jaxmt/sharding/multihost.py.")
    g.add_argument("--coordinator_address", default=None,
                   help="host:port of process 0, the same on every process")
    g.add_argument("--num_processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process_id", type=int, default=None,
                   help="this process's index, 0 .. num_processes-1")
    g.add_argument("--cluster_detection", default=None, choices=CLUSTER_DETECTION,
                   help="'off': never start jax.distributed; 'auto': let JAX detect the "
                        "cluster (e.g. a GCE TPU VM); or force one JAX detection method")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxmt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a model")
    t.add_argument("--gin_file", action="append", help="gin file; repeatable")
    t.add_argument("--model_dir", required=True)
    _add_distributed_flags(t)
    e = sub.add_parser("eval", help="BLEU/chrF per direction on a split")
    e.add_argument("--model_dir", required=True)
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--max_examples", type=int, default=None)
    e.add_argument("--json", action="store_true", help="last line is one JSON object")
    _add_inference_flags(e)
    tr = sub.add_parser("translate", help="translate lines from stdin or --input")
    tr.add_argument("--model_dir", required=True)
    tr.add_argument("--src_lang", default=None, help="required by jaxmt-trained models")
    tr.add_argument("--tgt_lang", default=None,
                    help="required by jaxmt-trained and multilingual imported models")
    tr.add_argument("--input", default=None)
    tr.add_argument("--output", default=None)
    _add_inference_flags(tr)
    c = sub.add_parser("convert", help="import a Hugging Face T5 / mT5 / MarianMT checkpoint")
    c.add_argument("--from_hf", required=True, help="directory with config.json, weights and "
                   "tokenizer files")
    c.add_argument("--out", required=True, help="new jaxmt model directory")
    c.add_argument("--precision", default="fp32", help="ModelConfig.precision of the result")
    c.add_argument("--scan_layers", action="store_true", help="stack layers for nn.scan")
    c.add_argument("--input_prefix", default=None,
                   help="text before every source sentence; {src}/{tgt} become the language "
                        "codes (e.g. 'translate English to German: ' for T5)")
    _add_data_parser(sub)
    _add_vocab_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from jaxmt.hostmem import keep_freed_memory
    keep_freed_memory()  # before any JAX computation; see jaxmt/hostmem.py
    argv = list(sys.argv[1:] if argv is None else argv)
    gin_overrides = [a for a in argv if a.startswith("--gin.")]
    rest = [a for a in argv if not a.startswith("--gin.")]
    args = build_parser().parse_args(rest)
    if gin_overrides and args.command not in ("train", "vocab") and not (
            args.command == "data" and args.data_command in ("mixture", "cache")):
        raise SystemExit("error: --gin.NAME=VALUE applies to `jaxmt train`, `jaxmt vocab`, "
                         "`jaxmt data mixture` and `jaxmt data cache` only")
    if args.command == "train":
        return cmd_train(args, gin_overrides)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "convert":
        return cmd_convert(args)
    if args.command == "vocab":
        if args.command_vocab == "train":
            return cmd_vocab_train(args, gin_overrides)
        return cmd_vocab_report(args, gin_overrides)
    if args.command == "data" and args.data_command == "mixture":
        return cmd_data_mixture(args, gin_overrides)
    if args.command == "data" and args.data_command == "cache":
        return cmd_data_cache(args, gin_overrides)
    if args.command == "data":
        return cmd_data_validate(args)
    return cmd_translate(args)


if __name__ == "__main__":
    sys.exit(main())
