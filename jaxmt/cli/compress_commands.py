"""`jaxmt quantize | prune | distill translate`: making a trained model small and fast.

Each reads a model directory (never writing into it) and writes a new one, or for
`distill translate` a distilled corpus; see jaxmt/compress/.
"""

from __future__ import annotations


def _outside(out_flag: str, source: str, what: str) -> str:
    """``--out`` made absolute; one line when it is ``source`` or inside it (a source is
    never written to)."""
    import os

    out, source = os.path.abspath(out_flag), os.path.abspath(source)
    if out == source or out.startswith(source + os.sep):
        raise SystemExit(f"error: --out={out_flag}: inside {what}, which is only read; pass "
                         "a directory elsewhere")
    return out


def _source_model(args, verb: str):
    """The float jaxmt model config of ``--model_dir``, with ``--out`` checked: one line
    (no JAX) for a missing or Hugging Face directory, a non-empty ``--out``, a directory
    that is no model, or a quantized one."""
    import os

    from jaxmt import config as cfglib
    from jaxmt.cli.model_commands import model_configs

    flag = f"--model_dir={args.model_dir}"
    if not os.path.isdir(args.model_dir):
        raise SystemExit(f"error: {flag}: no such directory")
    _outside(args.out, args.model_dir, "--model_dir")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise SystemExit(f"error: --out={args.out}: already exists and is not an empty "
                         "directory")
    if (not os.path.exists(os.path.join(args.model_dir, cfglib.CONFIG_FILE))
            and os.path.exists(os.path.join(args.model_dir, "config.json"))):
        raise SystemExit(f"error: {flag}: a Hugging Face folder; convert it first "
                         f"(`jaxmt convert --from_hf=DIR --out=NEW`) and {verb} NEW")
    model = model_configs(args.model_dir)["model"]  # one line for a directory that is no model
    if model.quant != "none":
        hint = ("quantize its float source instead" if verb == "quantize" else
                f"{verb} its float source, then quantize the result")
        raise SystemExit(f"error: {flag}: already quantized (ModelConfig.quant={model.quant!r}); "
                         f"{hint}")
    return model


def cmd_quantize(args, gin_overrides) -> int:
    """Checks the directories (no JAX), then quantizes and reports the sizes."""
    _source_model(args, "quantize")
    from jaxmt.compress.quantize import quantize

    s = quantize(args.model_dir, args.out, args.mode)
    print(f"quantized {args.model_dir} -> {args.out} ({s['mode']}): parameters "
          f"{s['float_param_bytes'] / 2**20:.1f} MiB -> {s['param_bytes'] / 2**20:.1f} MiB "
          f"({s['param_bytes'] / s['float_param_bytes']:.0%}); {s['dir_bytes'] / 2**20:.1f} "
          "MiB on disk; decode-only", flush=True)
    return 0


def _add_quantize(sub) -> None:
    """`jaxmt quantize` (jaxmt/compress/quantize.py)."""
    q = sub.add_parser("quantize", help="int8 post-training quantization of a trained model, "
                       "for inference")
    q.add_argument("--model_dir", required=True,
                   help="a jaxmt model directory (trained, fine-tuned, exported or converted); "
                        "read only. LoRA is merged into the weights first")
    q.add_argument("--out", required=True, help="new directory")
    q.add_argument("--mode", default="int8", choices=("int8", "w8a8"),
                   help="int8: weights only (int8 stored, dequantized into the compute dtype); "
                        "w8a8: activations too, per token, with int8 x int8 -> int32 dots "
                        "(default: int8)")
    q.set_defaults(func=cmd_quantize)


def cmd_prune(args, gin_overrides) -> int:
    """Checks the flags and directories (no weights read), then prunes and reports."""
    if (args.sparsity is None) == (args.structured is None):
        raise SystemExit("error: --sparsity and --structured: give exactly one (--sparsity=S "
                         "zeroes the smallest weights, --structured=F removes heads and MLP "
                         "units)")
    name, value = (("sparsity", args.sparsity) if args.sparsity is not None
                   else ("structured", args.structured))
    if not 0.0 < value < 1.0:
        raise SystemExit(f"error: --{name}={value}: must be a fraction in (0, 1), e.g. "
                         f"--{name}={0.5 if name == 'sparsity' else 0.3}")
    if args.multiple_of < 1:
        raise SystemExit(f"error: --multiple_of={args.multiple_of}: must be >= 1")
    model = _source_model(args, "prune")
    from jaxmt.compress import prune

    if args.structured is not None:
        for field, n in (("num_heads", model.num_heads), ("mlp_dim", model.mlp_dim)):
            if prune.kept_count(n, args.structured, args.multiple_of) < 1:
                raise SystemExit(f"error: --structured={args.structured}: would leave no "
                                 f"{field} of ModelConfig.{field}={n}"
                                 + (f" (kept counts a multiple of --multiple_of="
                                    f"{args.multiple_of})" if args.multiple_of > 1 else "")
                                 + "; use a smaller fraction")
    s = prune.prune_model(args.model_dir, args.out, sparsity=args.sparsity,
                          structured=args.structured, multiple_of=args.multiple_of)
    if args.structured is not None:
        what = (f"heads {s['num_heads_before']} -> {s['num_heads_after']}, mlp_dim "
                f"{s['mlp_dim_before']} -> {s['mlp_dim_after']}")
    else:
        what = (f"{s['target_sparsity']:.1%} of the attention/MLP weights are zero (stored "
                "dense: the same size and speed until a sparse kernel uses them)")
    print(f"pruned {args.model_dir} -> {args.out}: {what}; parameters "
          f"{s['params_before'] / 1e6:.2f}M -> {s['params_after'] / 1e6:.2f}M", flush=True)
    return 0


def _add_prune(sub) -> None:
    """`jaxmt prune` (jaxmt/compress/prune.py)."""
    p = sub.add_parser("prune", help="prune a trained model: zero its smallest weights, or "
                       "remove attention heads and MLP units (a smaller, faster model)")
    p.add_argument("--model_dir", required=True,
                   help="a jaxmt model directory (trained, fine-tuned, exported or converted); "
                        "read only. LoRA is merged into the weights first")
    p.add_argument("--out", required=True, help="new directory")
    p.add_argument("--sparsity", type=float, default=None,
                   help="unstructured: zero this fraction of every attention/MLP weight "
                        "matrix, smallest magnitudes first (e.g. 0.5)")
    p.add_argument("--structured", type=float, default=None,
                   help="structured: remove this fraction of the attention heads and of the "
                        "MLP hidden units of every layer, least important (weight norms) "
                        "first; ModelConfig.num_heads and mlp_dim shrink (e.g. 0.3)")
    p.add_argument("--multiple_of", type=int, default=1,
                   help="with --structured: round the kept heads and units down to a multiple "
                        "of this (e.g. the tensor-parallel size, or 8; default 1)")
    p.set_defaults(func=cmd_prune)


def _writable_dir_error(path: str) -> str | None:
    """Why ``path`` cannot become a directory we write into (None: it can), without
    creating anything: the nearest existing ancestor must be a writable directory."""
    import os

    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        return "a file, not a directory"
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        return f"{p} is a file, not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def cmd_distill_translate(args, gin_overrides) -> int:
    """Checks the flags, teacher, config and languages (no JAX), reads the training sources,
    then decodes this process's chunks; process 0 assembles OUT and prints the summary."""
    import json
    import os
    import sys

    from jaxmt import config as cfglib
    from jaxmt.cli.model_commands import decode_config, mesh_config, model_configs
    from jaxmt.data import distilled  # pure Python: no TensorFlow
    from jaxmt.gin_files import parse_gin
    from jaxmt.inference.tokenizer import check_model_langs
    from jaxmt.sharding import multihost

    teacher = os.path.abspath(args.teacher)
    if not os.path.isdir(teacher):
        what = "a file, not a directory" if os.path.exists(teacher) else "no such directory"
        raise SystemExit(f"error: --teacher={args.teacher}: {what}; pass a model directory "
                         "(written by `jaxmt train` or `jaxmt convert`, or a Hugging Face folder)")
    if not any(os.path.exists(os.path.join(teacher, n)) for n in (cfglib.CONFIG_FILE,
                                                                   "config.json")):
        raise SystemExit(f"error: --teacher={args.teacher}: not a model directory (no "
                         f"{cfglib.CONFIG_FILE})")
    for name in ("max_per_direction", "chunk_size", "batch_tokens", "max_len"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SystemExit(f"error: --{name}={value}: must be positive")
    out = _outside(args.out, teacher, "the teacher's directory")
    why = _writable_dir_error(out)
    if why:
        raise SystemExit(f"error: --out={args.out}: {why}")
    try:
        multihost.plan(args.coordinator_address, args.num_processes, args.process_id,
                       args.cluster_detection)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    cfgs = model_configs(teacher)  # one line for a broken directory
    decode = decode_config(args, cfgs)
    mesh = mesh_config(args)
    parse_gin(args.gin_file or [], gin_overrides, configs_only=True)
    try:
        data_cfg = cfglib.DataConfig()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for src, tgt in data_cfg.directions:
        try:
            check_model_langs(cfgs, src, tgt, model_dir=teacher)
        except ValueError as e:
            raise SystemExit(f"error: --teacher={args.teacher} cannot translate {src}-{tgt}, a "
                             f"training direction of the gin config: {e}") from None
    try:  # what training reads, cleaned as training cleans it
        pairs = distilled.train_pairs(data_cfg)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    n = args.max_per_direction
    sources = {d: [s for s, _ in (p[:n] if n else p)] for d, p in pairs.items()}

    where = multihost.initialize(args.coordinator_address, args.num_processes,
                                 args.process_id, args.cluster_detection)
    from jaxmt.compress.distill_data import default_max_len, distill_translate

    os.makedirs(out, exist_ok=True)
    result = distill_translate(teacher, sources, out, decode=decode,
                               max_len=args.max_len or default_max_len(cfgs),
                               chunk_size=args.chunk_size, mesh=mesh,
                               batch_tokens=args.batch_tokens, stop_after=args.stop_after_chunks,
                               progress=not args.json)
    for note in result.get("notes", ()):
        print(note, file=sys.stderr, flush=True)
    run, pi, pc = result["run"], result["process"], result["processes"]
    if run["stopped"]:
        raise SystemExit(f"error: stopped after {run['chunks']} chunk(s) "
                         f"(--stop_after_chunks={args.stop_after_chunks}); rerun the same "
                         "command to resume")
    speed = run["sentences"] / run["seconds"] if run["seconds"] else 0.0
    line = (f"process {pi} of {pc}: translated {run['sentences']:,} sentences in "
            f"{run['chunks']} chunks, {run['seconds']:.1f}s ({speed:.1f} sentences/s); "
            f"{run['already']} of its chunks were already done")
    if args.json:
        print(json.dumps({**result, "where": where, "sentences_per_second": speed}), flush=True)
        return 0
    if "manifest" not in result:
        print(f"{line}; process 0 assembles {args.out}", flush=True)
        return 0
    m = result["manifest"]
    t = m["teacher"]
    print(f"distilled {m['sentences']:,} training sources of {len(m['directions'])} "
          f"direction(s) with {t['path']}{'' if t['step'] is None else ' step %d' % t['step']}"
          f", beam {m['beam']} -> {args.out}", flush=True)
    for key, d in m["directions"].items():
        print(f"  {key:<12} {d['sentences']:>10,} sentences {d['empty']:>7,} empty   "
              f"{os.path.join(args.out, d['file'])}", flush=True)
    if m["empty"]:
        print(f"note: {m['empty']} empty teacher output(s) are kept as empty lines; training "
              "skips them (reason empty_side, counted in its data report)", flush=True)
    print(line, flush=True)
    print(f"train on it: --gin.DataConfig.distilled='\"{args.out}\"' (and "
          "DataConfig.distilled_rate to mix in the references)", flush=True)
    return 0


def _add_distill(sub) -> None:
    """`jaxmt distill translate` (jaxmt/compress/distill_data.py)."""
    import argparse

    from jaxmt.compress.distill_data import CHUNK_SIZE
    from jaxmt.sharding.multihost import CLUSTER_DETECTION

    d = sub.add_parser("distill", help="knowledge distillation: a teacher's outputs as "
                       "training data")
    dsub = d.add_subparsers(dest="distill_command", required=True)
    t = dsub.add_parser(
        "translate", help="beam-decode every training source with a teacher (sequence-level "
        "distillation data)",
        description="Reads the run's DataConfig from --gin_file/--gin.NAME=VALUE (as `jaxmt "
        "train` does), takes the source side of the training split of every direction of "
        "its mixture (cleaned as training cleans it), translates it with --teacher and "
        "writes OUT/<src>-<tgt>.train.tsv (source TAB teacher output, in source order) and "
        "OUT/distilled.json. Train a student on it with DataConfig.distilled=OUT "
        "(DataConfig.distilled_rate mixes in the references). The work is cut into chunks, "
        "each written as it finishes: rerun the same command after an interruption to "
        "resume. Several processes (hosts) split the chunks: run the command on each with "
        "--coordinator_address/--num_processes/--process_id; each decodes on its own "
        "devices (data parallel), process 0 assembles.")
    t.add_argument("--teacher", required=True, help="the teacher's model directory (a jaxmt "
                   "directory, a `jaxmt convert` output or a Hugging Face folder); read only")
    t.add_argument("--gin_file", action="append", help="the run's gin file; repeatable")
    t.add_argument("--out", required=True, help="output directory (created; an unfinished "
                   "one from the same teacher and config resumes, another one is refused)")
    t.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default "
                   "%(default)s; the teacher's other decoding settings are kept)")
    t.add_argument("--max_per_direction", type=int, default=None, help="only the first N "
                   "sources of each direction (default: all)")
    t.add_argument("--batch_tokens", type=int, default=16384, help="source tokens x beams per "
                   "decoding call (default %(default)s)")
    t.add_argument("--chunk_size", type=int, default=CHUNK_SIZE, help="sources per chunk, the "
                   "unit of resuming and of sharding over processes (default %(default)s)")
    t.add_argument("--max_len", type=int, default=None, help="source and output token limit "
                   "(default: the teacher's DataConfig.max_eval_len)")
    t.add_argument("--mesh", default=None, help="this process's device mesh, e.g. data=4,"
                   "tensor=2 (as `jaxmt translate --mesh`; default: data parallel over all of "
                   "this process's devices)")
    t.add_argument("--json", action="store_true", help="no progress bar; print one JSON "
                   "object (the last line)")
    g = t.add_argument_group("multi-process", "As `jaxmt train`: unset flags fall back to "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; "
                             "SLURM and multi-host Cloud TPUs are detected.")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    g.add_argument("--num_processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process_id", type=int, default=None, help="this process's index")
    g.add_argument("--cluster_detection", default=None, choices=CLUSTER_DETECTION,
                   help="'off', 'auto' or a JAX detection method (see `jaxmt train -h`)")
    t.add_argument("--stop_after_chunks", type=int, default=None,
                   help=argparse.SUPPRESS)  # tests: an interruption after K chunks
    t.set_defaults(func=cmd_distill_translate, takes_gin=True)


def add_parsers(sub) -> None:
    """The quantize, prune and distill subcommands."""
    _add_quantize(sub)
    _add_prune(sub)
    _add_distill(sub)
