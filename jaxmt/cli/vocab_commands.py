"""`jaxmt vocab train | report`: a balanced SentencePiece vocabulary and how it does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from jaxmt.cli.checks import load_vocab
from jaxmt.gin_files import parse_gin  # imports gin and the configs, no JAX


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
    load_vocab(path, "pass --vocab=FILE.model, a SentencePiece model from `jaxmt vocab "
               "train` or `jaxmt train`" if args.vocab else "copy spm.model from the "
               "training run")
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


def add_parser(sub) -> None:
    """The vocab train and report subcommands."""
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
    t.set_defaults(func=cmd_vocab_train, takes_gin=True)
    r.set_defaults(func=cmd_vocab_report, takes_gin=True)
