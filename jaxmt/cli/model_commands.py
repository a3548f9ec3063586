"""`jaxmt train | eval | translate | convert`: the commands that run a model.

Inference (eval, translate) checks its arguments, the model directory and the
languages before anything is loaded, and never writes into the model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxmt.cli.checks import load_vocab
from jaxmt.gin_files import parse_gin  # imports gin and the configs, no JAX
from jaxmt.sharding.multihost import CLUSTER_DETECTION  # jax only when initialising


def cmd_train(args, gin_overrides) -> int:
    from jaxmt.sharding import multihost

    if args.init_from and not os.path.isdir(args.init_from):
        raise SystemExit(f"error: --init_from={args.init_from}: no such directory")
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
    last = train(model_dir=args.model_dir, init_from=args.init_from)
    if "stopped_at" in last:  # SIGTERM/SIGINT: saved; exit 0 so schedulers requeue
        print(f"train stopped by {last['stopped_by']} after {time.time() - t0:.0f}s at step "
              f"{last['stopped_at']}; rerun the same command to resume", flush=True)
        return 0
    print(f"train finished in {time.time() - t0:.0f}s; model directory {args.model_dir}",
          flush=True)
    return 0


def inference_options(args) -> dict:
    """Translator keywords from --max_len / --attention (long inputs at inference)."""
    opts = {}
    if args.max_len is not None:
        opts.update(max_src_len=args.max_len, max_decode_len=args.max_len)
    if args.attention is not None:
        opts["encoder_attention"] = args.attention  # the rest of AttentionConfig stays
    return opts


# Decoding flag -> the DecodeConfig field it sets (for error messages).
_DECODE_FLAGS = {"beam": "beam_size", "n_best": "n_best", "length_penalty": "alpha",
                 "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "max_len_a": "max_len_a", "max_len_b": "max_len_b",
                 "no_repeat_ngram_size": "no_repeat_ngram_size", "seed": "seed"}
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p")


def decode_config(args, cfgs: dict):
    """The model directory's DecodeConfig with the decoding flags applied; checked before
    anything is loaded. A bad value exits naming the flag."""
    import dataclasses

    from jaxmt.config import IMPORTED_DECODE, LENGTH_PENALTIES, DecodeConfig

    base = cfgs.get("decode") or (IMPORTED_DECODE if "tokenizer" in cfgs else DecodeConfig())
    given = {k: getattr(args, k, None) for k in (*_DECODE_FLAGS, "sample")}
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    over = {_DECODE_FLAGS[k]: v for k, v in given.items() if k in _DECODE_FLAGS}
    for k in _SAMPLING_FLAGS:
        if k in given and "sample" not in given and base.strategy != "sample":
            raise SystemExit(f"error: --{k}={given[k]}: applies to sampling only; add --sample")
    if "sample" in given:
        if "beam" in given:
            raise SystemExit("error: --sample and --beam: pick one decoding strategy")
        over["strategy"] = "sample"
        over["num_decodes"] = max(over.get("n_best", 1), 1)
    if "beam" in given:
        over["strategy"] = "beam" if args.beam > 1 else "greedy"
    if "length_penalty" in given:  # ALPHA, or FORM:ALPHA, or none
        form, _, alpha = str(args.length_penalty).rpartition(":")
        if alpha == "none":
            form, alpha = "none", "0"
        try:
            over["alpha"] = float(alpha)
        except ValueError:
            raise SystemExit(f"error: --length_penalty={args.length_penalty}: give ALPHA "
                             f"(e.g. 0.6) or FORM:ALPHA with FORM one of "
                             f"{', '.join(LENGTH_PENALTIES)} (e.g. power:1.0), or none") from None
        over["length_penalty"] = form or (base.length_penalty if base.length_penalty != "none"
                                          else "power")
    try:
        return dataclasses.replace(base, **over)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        field = msg.split(":")[0].removeprefix("DecodeConfig.")
        setters = {**{f: k for k, f in _DECODE_FLAGS.items()}, "length_penalty": "length_penalty",
                   "num_decodes": "sample", "strategy": "sample" if "sample" in given else "beam"}
        flag = setters.get(field, "beam")
        value = f"={given[flag]}" if flag in given and flag != "sample" else ""
        raise SystemExit(f"error: --{flag}{value}: {msg}") from None


_MESH_AXES = ("replica", "data", "fsdp", "tensor")
_MESH_HELP = ("give AXIS=SIZE pairs separated by commas, e.g. --mesh=data=4,tensor=2 (axes: "
              f"{', '.join(_MESH_AXES)}; one SIZE may be -1: the remaining devices; also "
              "shard_params=false)")


def mesh_config(args):
    """--mesh as a MeshConfig (None: one device), checked before anything is loaded.

    Axes left out are 1, except ``data``, which takes the remaining devices (-1)
    unless another axis does. A mistake exits naming the flag.
    """
    import difflib

    from jaxmt.config import MeshConfig

    if args.mesh is None:
        return None
    flag = f"--mesh={args.mesh}"
    given = {}
    for item in args.mesh.split(","):
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not name or not value:
            raise SystemExit(f"error: {flag}: {_MESH_HELP}")
        if name not in (*_MESH_AXES, "shard_params"):
            close = difflib.get_close_matches(name, (*_MESH_AXES, "shard_params"), n=1)
            raise SystemExit(f"error: {flag}: unknown axis {name!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; {_MESH_HELP}")
        if name in given:
            raise SystemExit(f"error: {flag}: {name} is given twice")
        if name == "shard_params":
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"error: {flag}: shard_params={value}: give true or false")
            given[name] = value.lower() == "true"
            continue
        try:
            given[name] = int(value)
        except ValueError:
            raise SystemExit(f"error: {flag}: {name}={value}: not an integer; "
                             f"{_MESH_HELP}") from None
    if "data" not in given:
        given["data"] = 1 if -1 in given.values() else -1
    try:
        return MeshConfig(**given)
    except ValueError as e:
        raise SystemExit(f"error: {flag}: {str(e).splitlines()[0]}") from None


def check_mesh(args, mesh, model_cfg) -> None:
    """The mesh against the devices and the model's dimensions (loads JAX, no weights)."""
    if mesh is None:
        return
    from jaxmt.inference.translator import make_partitioner

    try:
        make_partitioner(mesh).check_model(model_cfg)
    except ValueError as e:
        raise SystemExit(f"error: --mesh={args.mesh}: {str(e).splitlines()[0]}") from None


def check_inference_flags(args) -> None:
    """--max_len, --max_examples and --attention, before anything is loaded."""
    from jaxmt.config import ATTENTION_IMPLS

    if args.max_len is not None and args.max_len <= 0:
        raise SystemExit(f"error: --max_len={args.max_len}: must be a positive number of "
                         "tokens, e.g. --max_len=512 (or leave it out for the model's limit)")
    n = getattr(args, "max_examples", None)
    if n is not None and n <= 0:
        raise SystemExit(f"error: --max_examples={n}: must be a positive number of "
                         "sentences per direction (or leave it out to score them all)")
    if args.attention is not None and args.attention not in ATTENTION_IMPLS:
        raise SystemExit(f"error: --attention={args.attention}: unknown implementation; "
                         f"choose one of {', '.join(ATTENTION_IMPLS)}")


def model_configs(model_dir: str) -> dict:
    """The configs of a model directory, read cheaply: no weights, no JAX (a Hugging
    Face folder: its config and tokenizer files only). A bad directory exits."""
    from jaxmt import config as cfglib

    flag = f"--model_dir={model_dir}"
    pass_one = ("pass a directory written by `jaxmt train` or `jaxmt convert`, or a "
                "Hugging Face T5/mT5/MarianMT folder")
    if not os.path.isdir(model_dir):
        what = "a file, not a directory" if os.path.exists(model_dir) else "no such directory"
        raise SystemExit(f"error: {flag}: {what}; {pass_one}")
    if not os.path.exists(os.path.join(model_dir, cfglib.CONFIG_FILE)):
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            raise SystemExit(f"error: {flag}: not a model directory (no {cfglib.CONFIG_FILE}); "
                             f"{pass_one}")
        from jaxmt.inference import hf_import  # the same records Translator converts

        model, tokenizer, decode = hf_import.read_configs(model_dir, with_decode=True)
        return {"model": model, "tokenizer": tokenizer, "decode": decode}
    try:
        cfgs = cfglib.load(model_dir)
    except ValueError as e:  # the message names the file and the field
        raise SystemExit(f"error: {e}; fix the file, or copy it again from where the model "
                         "was trained or converted") from e
    if "tokenizer" in cfgs:
        for name in cfgs["tokenizer"].vocab_files:
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise SystemExit(f"error: {os.path.join(model_dir, name)}: missing; the model "
                                 "directory is incomplete (run `jaxmt convert` again)")
    else:
        load_vocab(os.path.join(model_dir, cfglib.VOCAB_FILE), "the model directory is "
                   "incomplete (copy spm.model from the training run)")
    return cfgs


def _add_inference_flags(p: argparse.ArgumentParser, model_dir_help: str) -> None:
    p.add_argument("--model_dir", required=True, help=model_dir_help + "; read only")
    p.add_argument("--max_len", type=int, default=None,
                   help="source and output token limit (default: DataConfig.max_eval_len)")
    p.add_argument("--attention", default=None,
                   help="encoder attention implementation for long inputs, e.g. auto, local, "
                        "flash (AttentionConfig.encoder; the other attention settings stay "
                        "as trained; default: the trained setting)")
    p.add_argument("--mesh", default=None,
                   help="decode on a device mesh, e.g. data=8 (the batch split 8 ways) or "
                        "data=4,tensor=2 (parameters split as jaxmt.sharding.axes says, for "
                        "a model too large for one device); axes replica, data, fsdp, tensor "
                        "(MeshConfig), one of them -1 for the remaining devices; axes left "
                        "out are 1, except data, which takes the rest (default: one device)")
    g = p.add_argument_group("decoding", "Override the model directory's DecodeConfig (its "
                             "`decode` section; jaxmt models: beam 4, GNMT penalty 0.6, outputs "
                             "up to 2 x source + 10 tokens, no 4-gram twice; imported models: "
                             "their generation defaults).")
    g.add_argument("--beam", type=int, default=None, help="beam size; 1 = greedy")
    g.add_argument("--sample", action="store_true", help="sample instead of searching")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    g.add_argument("--top_k", type=int, default=None, help="sample from the k likeliest (0: all)")
    g.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (1: all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--length_penalty", default=None,
                   help="ALPHA for the model's penalty form, FORM:ALPHA (gnmt: ((5+len)/6)^a, "
                        "power: len^a), or none")
    g.add_argument("--max_len_a", type=float, default=None,
                   help="outputs have at most A x source tokens + B tokens")
    g.add_argument("--max_len_b", type=int, default=None, help="see --max_len_a")
    g.add_argument("--no_repeat_ngram_size", type=int, default=None,
                   help="never generate an n-gram twice (0: off)")


def cmd_eval(args, gin_overrides) -> int:
    check_inference_flags(args)
    cfgs = model_configs(args.model_dir)
    decode = decode_config(args, cfgs)
    mesh = mesh_config(args)
    if "data" not in cfgs:
        raise SystemExit(f"error: --model_dir={args.model_dir}: no data section (an imported "
                         "model); `jaxmt eval` scores the directions a model was trained on, "
                         "use `jaxmt translate` instead")
    if args.step is not None:  # checked from the listing: no JAX loaded for a typo
        ckdir = os.path.join(args.model_dir, "checkpoints")
        steps = sorted(int(n) for n in (os.listdir(ckdir) if os.path.isdir(ckdir) else ())
                       if n.isdigit())
        if args.step not in steps:
            raise SystemExit(f"error: --step={args.step}: {args.model_dir} has no checkpoint "
                             f"step {args.step} (it has {steps or 'none'})")
    from jaxmt.inference.evaluation import evaluate, format_table
    from jaxmt.inference.translator import Translator

    check_mesh(args, mesh, cfgs["model"])
    tr = Translator.from_pretrained(args.model_dir, step=args.step, decode=decode, mesh=mesh,
                                    **inference_options(args))
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


def cmd_translate(args, gin_overrides) -> int:
    check_inference_flags(args)
    from jaxmt.inference.tokenizer import check_model_langs

    cfgs = model_configs(args.model_dir)
    check_model_langs(cfgs, args.src_lang, args.tgt_lang, names=("--src_lang", "--tgt_lang"),
                      model_dir=args.model_dir)
    decode = decode_config(args, cfgs)
    mesh = mesh_config(args)
    if args.input and not os.path.isfile(args.input):
        raise SystemExit(f"error: --input={args.input}: no such file; pass a text file, one "
                         "sentence per line, or leave --input out to read stdin")
    out_dir = os.path.dirname(os.path.abspath(args.output)) if args.output else None
    if out_dir and not os.path.isdir(out_dir):
        raise SystemExit(f"error: --output={args.output}: no directory {out_dir}; create it "
                         "first")
    from jaxmt.fileio import write_atomic
    from jaxmt.inference.translator import Translator, translate_stream

    check_mesh(args, mesh, cfgs["model"])
    tr = Translator.from_pretrained(args.model_dir, decode=decode, mesh=mesh,
                                    **inference_options(args))
    data = Path(args.input).read_bytes() if args.input else sys.stdin.buffer.read()
    out = translate_stream(tr, data, args.src_lang, args.tgt_lang, n_best=args.n_best)
    if args.output:
        write_atomic(args.output, out)
    else:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    return 0


def cmd_convert(args, gin_overrides) -> int:
    from jaxmt.inference.hf_import import convert

    imported = convert(args.from_hf, args.out, precision=args.precision,
                       scan_layers=args.scan_layers, input_prefix=args.input_prefix)
    m, tok = imported.model, imported.tokenizer
    print(f"converted {args.from_hf} -> {args.out}: {tok.kind}, vocab {m.vocab_size}, "
          f"{m.num_encoder_layers}+{m.num_decoder_layers} layers, d_model {m.emb_dim}, "
          f"input prefix {tok.input_prefix!r}", flush=True)
    return 0


def cmd_export(args, gin_overrides) -> int:
    if not os.path.isdir(args.model_dir):
        raise SystemExit(f"error: --model_dir={args.model_dir}: no such directory")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise SystemExit(f"error: --out={args.out}: already exists and is not an empty "
                         "directory")
    model_configs(args.model_dir)  # a clear error for a directory that is no model
    import jax

    from jaxmt.inference.export import export

    tr = export(args.model_dir, args.out, merge_lora=args.merge_lora)
    n = sum(int(x.size) for x in jax.tree.leaves(tr.params))
    print(f"exported {args.model_dir} -> {args.out}"
          f"{' with LoRA merged' if args.merge_lora else ''}: {n / 1e6:.2f}M parameters, "
          "self-contained", flush=True)
    return 0


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



def add_parsers(sub) -> None:
    """The train, eval, translate and convert subcommands."""
    t = sub.add_parser("train", help="train (or resume) a model")
    t.add_argument("--gin_file", action="append", help="gin file; repeatable")
    t.add_argument("--model_dir", required=True)
    t.add_argument("--init_from", default="",
                   help="start from this pretrained base (never modified): a Hugging Face "
                        "T5/mT5/MarianMT folder, a `jaxmt convert` output or a jaxmt model "
                        "directory; its weights, architecture and tokenizer are used "
                        "(run file: runs/finetune.gin)")
    _add_distributed_flags(t)
    t.set_defaults(func=cmd_train, takes_gin=True)
    e = sub.add_parser("eval", help="BLEU/chrF per direction on a split")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--max_examples", type=int, default=None)
    e.add_argument("--step", type=int, default=None,
                   help="score this checkpoint step (default: the newest readable one)")
    e.add_argument("--json", action="store_true", help="last line is one JSON object")
    _add_inference_flags(e, "a directory written by `jaxmt train`")
    e.set_defaults(func=cmd_eval)
    tr = sub.add_parser("translate", help="translate lines from stdin or --input")
    tr.add_argument("--src_lang", default=None, help="required by jaxmt-trained models")
    tr.add_argument("--tgt_lang", default=None,
                    help="required by jaxmt-trained and multilingual imported models")
    tr.add_argument("--input", default=None)
    tr.add_argument("--output", default=None)
    tr.add_argument("--n_best", type=int, default=None,
                    help="K outputs per input line, as K lines INDEX<TAB>SCORE<TAB>TEXT "
                         "(INDEX: the input line, from 0); needs --beam >= K or --sample")
    _add_inference_flags(tr, "a directory written by `jaxmt train` or `jaxmt convert`, or "
                         "a Hugging Face T5/mT5/MarianMT folder")
    tr.set_defaults(func=cmd_translate)
    c = sub.add_parser("convert", help="import a Hugging Face T5 / mT5 / MarianMT checkpoint")
    c.add_argument("--from_hf", required=True, help="directory with config.json, weights and "
                   "tokenizer files")
    c.add_argument("--out", required=True, help="new jaxmt model directory")
    c.add_argument("--precision", default="fp32", help="ModelConfig.precision of the result")
    c.add_argument("--scan_layers", action="store_true", help="stack layers for nn.scan")
    c.add_argument("--input_prefix", default=None,
                   help="text before every source sentence; {src}/{tgt} become the language "
                        "codes, {src_name}/{tgt_name} their English names (e.g. 'translate "
                        "{src_name} to {tgt_name}: ' for T5)")
    c.set_defaults(func=cmd_convert)
    x = sub.add_parser("export", help="write a fine-tuned model (adapters/LoRA and their base) "
                       "as one self-contained directory")
    x.add_argument("--model_dir", required=True, help="a directory written by `jaxmt train`")
    x.add_argument("--out", required=True, help="new directory")
    x.add_argument("--merge_lora", action="store_true",
                   help="fold LoRA factors into the base weights (same outputs, no extra cost)")
    x.set_defaults(func=cmd_export)
