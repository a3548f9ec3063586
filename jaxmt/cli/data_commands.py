"""`jaxmt data validate | mixture | cache`: check and prepare parallel corpora."""

from __future__ import annotations

import json
import os
import sys
import time

from jaxmt.gin_files import parse_gin  # imports gin and the configs, no JAX


def cmd_data_validate(args, gin_overrides) -> int:
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


def _base_tokenizer(model_dir: str | None):
    """The TextFormat of a directory fine-tuned from an imported base (`jaxmt train
    --init_from`: its tokenizer section and files), which its data is tokenised with;
    None for a directory that uses spm.model."""
    from jaxmt import config as cfglib

    if not model_dir or not os.path.exists(os.path.join(model_dir, cfglib.CONFIG_FILE)):
        return None
    try:
        cfgs = cfglib.load(model_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if "tokenizer" not in cfgs:
        return None
    from jaxmt.inference.tokenizer import text_format

    return text_format(model_dir, cfgs["tokenizer"], cfgs["model"].vocab_size)


def cmd_data_mixture(args, gin_overrides) -> int:
    import tempfile

    data_cfg, train_cfg = _data_configs(args, gin_overrides)
    steps = args.steps if args.steps is not None else train_cfg.steps
    batch_size = args.batch_size if args.batch_size is not None else train_cfg.batch_size
    if steps <= 0 or batch_size <= 0 or args.pack_rows <= 0:
        raise SystemExit("error: --steps, --batch_size and --pack_rows must be positive")
    from jaxmt import config as cfglib
    from jaxmt.data import mixture as mixlib
    from jaxmt.data import tasks, vocab  # TensorFlow: after the checks
    fmt = None if args.vocab else _base_tokenizer(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="jaxmt_mixture_") as tmp:
        if fmt is not None:
            spm_path = None
        elif args.vocab:
            spm_path = args.vocab
        elif args.model_dir:
            spm_path = os.path.join(args.model_dir, cfglib.VOCAB_FILE)
        else:  # the vocabulary `jaxmt train` would make for this config
            spm_path = os.path.join(tmp, cfglib.VOCAB_FILE)
            print(f"training a {data_cfg.vocab_size}-piece SentencePiece vocabulary as "
                  "`jaxmt train` would (pass --vocab or --model_dir to reuse one)",
                  file=sys.stderr, flush=True)
            vocab.train_for_config(spm_path, data_cfg, train_cfg.seed)
        if fmt is None and not os.path.exists(spm_path):
            raise SystemExit(f"error: {spm_path}: no SentencePiece model there")
        try:
            mixture = tasks.register_from_config(data_cfg, spm_path, text_format=fmt)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        stats = tasks.mixture_stats(mixture, fmt or spm_path, token_sample=args.token_sample)
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
        for row, s in zip(table["directions"], stats):  # a direction may have two Tasks
            row["task"] = s["task"]
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
    if args.num_shards <= 0:
        raise SystemExit(f"error: --num_shards={args.num_shards}: must be positive")
    data_cfg, train_cfg = _data_configs(args, gin_overrides)
    from jaxmt import config as cfglib
    from jaxmt.data import cache, tasks, vocab  # TensorFlow: after the checks

    cache_dir = args.cache_dir or data_cfg.cache_dir or (
        args.model_dir and os.path.join(args.model_dir, cfglib.CACHE_DIR))
    if not cache_dir:
        raise SystemExit("error: where should the cache go? Pass --model_dir (the cache goes "
                         "to MODEL_DIR/data_cache, where `jaxmt train` looks), --cache_dir, or "
                         "set DataConfig.cache_dir")
    fmt = None if args.vocab else _base_tokenizer(args.model_dir)
    spm_path = args.vocab or (args.model_dir and os.path.join(args.model_dir, cfglib.VOCAB_FILE))
    # A directory fine-tuned from an imported base tokenises with the base's files (fmt).
    if fmt is None and not spm_path:
        raise SystemExit("error: pass --model_dir (its spm.model, trained there as `jaxmt "
                         "train` would if missing) or --vocab")
    if fmt is None and not os.path.exists(spm_path):
        if args.vocab:
            raise SystemExit(f"error: {spm_path}: no SentencePiece model there")
        print(f"training a {data_cfg.vocab_size}-piece SentencePiece vocabulary as `jaxmt "
              f"train` would -> {spm_path}", file=sys.stderr, flush=True)
        os.makedirs(args.model_dir, exist_ok=True)
        vocab.train_for_config(spm_path, data_cfg, train_cfg.seed)
    try:
        mixture = tasks.register_from_config(data_cfg, spm_path, text_format=fmt)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.time()
    rows = cache.build(cache_dir, mixture, fmt or spm_path, num_shards=args.num_shards,
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


def add_parser(sub) -> None:
    """The data validate, mixture and cache subcommands."""
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
    v.set_defaults(func=cmd_data_validate)
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
    m.set_defaults(func=cmd_data_mixture, takes_gin=True)
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
    c.set_defaults(func=cmd_data_cache, takes_gin=True)
