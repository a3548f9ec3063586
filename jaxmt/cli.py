"""The ``jaxmt`` command: train, eval, translate, convert.

    jaxmt train --gin_file=gin_configs/runs/demo.gin --gin.TRAIN_STEPS=100 --model_dir=runs/x
    jaxmt eval --model_dir=runs/x [--split=test] [--max_examples=N] [--json]
    jaxmt translate --model_dir=runs/x --src_lang=en --tgt_lang=de < in.txt > out.txt
    jaxmt convert --from_hf=opus-mt-en-de --out=runs/opus-en-de  # T5, mT5 or MarianMT
    jaxmt translate --model_dir=runs/opus-en-de < in.txt > out.txt

Multi-host training runs the same `jaxmt train` on every host, with the same
--model_dir (a shared filesystem) and --coordinator_address=HOST0:PORT
--num_processes=N --process_id=I (or JAX_* variables; SLURM and Cloud TPU are detected).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GIN_DIR = Path(__file__).resolve().parent.parent / "gin_configs"
# jaxmt.multihost.CLUSTER_DETECTION, kept here so `--help` does not import jax.
CLUSTER_DETECTION = ("auto", "off", "slurm", "ompi", "mpi4py", "gcetpu", "gketpu")


def _resolve_gin_file(name: str) -> str:
    for cand in (Path(name), GIN_DIR / name, GIN_DIR / f"{name}.gin"):
        if cand.is_file():
            return str(cand)
    raise SystemExit(f"error: --gin_file={name}: no such file (also looked in {GIN_DIR})")


def parse_gin(gin_files: list[str], overrides: list[str]) -> None:
    """Loads gin files then ``--gin.NAME=VALUE`` overrides, in that order."""
    import gin

    import jaxmt.config  # noqa: F401  (registers the configurables)
    import jaxmt.trainer  # noqa: F401

    gin.add_config_file_search_path(str(GIN_DIR))
    bindings = []
    for o in overrides:
        key, sep, value = o[len("--gin."):].partition("=")
        if not sep:
            raise SystemExit(f"error: {o}: expected --gin.NAME=VALUE")
        bindings.append(f"{key} = {value}")
    # gin tries the bare include path before the search path and logs an ERROR for the miss.
    quiet = _DropMessage("Path not found")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings([_resolve_gin_file(f) for f in gin_files], bindings)
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def cmd_train(args, gin_overrides) -> int:
    from jaxmt import multihost

    # Before gin (whose imports may build configs) and before anything touches devices.
    try:
        where = multihost.initialize(args.coordinator_address, args.num_processes,
                                     args.process_id, args.cluster_detection)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"jax.distributed: {where}", flush=True)
    parse_gin(args.gin_file or [], gin_overrides)
    from jaxmt.trainer import train

    t0 = time.time()
    train(model_dir=args.model_dir)
    print(f"train finished in {time.time() - t0:.0f}s; model directory {args.model_dir}",
          flush=True)
    return 0


def cmd_eval(args) -> int:
    from jaxmt import config as cfglib
    from jaxmt.evaluation import evaluate, format_table
    from jaxmt.translator import Translator

    cfgs = cfglib.load(args.model_dir)
    if "data" not in cfgs:
        raise SystemExit(f"error: {args.model_dir}: no data section (an imported model); "
                         "`jaxmt eval` scores the directions a model was trained on")
    tr = Translator.from_pretrained(args.model_dir)
    data_cfg = cfgs["data"]
    log = lambda d, r: print(f"{d}: BLEU {r['bleu']:.1f} chrF {r['chrf']:.1f} (n={r['n']})",
                             file=sys.stderr, flush=True)
    result = evaluate(tr, data_cfg.directions, split=args.split, max_examples=args.max_examples,
                      progress=log)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def cmd_translate(args) -> int:
    from jaxmt.translator import Translator, translate_stream

    tr = Translator.from_pretrained(args.model_dir)
    data = Path(args.input).read_bytes() if args.input else sys.stdin.buffer.read()
    out = translate_stream(tr, data, args.src_lang, args.tgt_lang)
    if args.output:
        Path(args.output).write_bytes(out)
    else:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    return 0


def cmd_convert(args) -> int:
    from jaxmt.hf_import import convert

    imported = convert(args.from_hf, args.out, precision=args.precision,
                       scan_layers=args.scan_layers, input_prefix=args.input_prefix)
    m, tok = imported.model, imported.tokenizer
    print(f"converted {args.from_hf} -> {args.out}: {tok.kind}, vocab {m.vocab_size}, "
          f"{m.num_encoder_layers}+{m.num_decoder_layers} layers, d_model {m.emb_dim}, "
          f"input prefix {tok.input_prefix!r}", flush=True)
    return 0


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process", "Run the same command once per process (host). Unset flags fall back "
        "to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; with none of them "
        "set, SLURM job steps (srun) and multi-host Cloud TPUs are detected, else the run is "
        "a single process. See jaxmt/multihost.py.")
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
    tr = sub.add_parser("translate", help="translate lines from stdin or --input")
    tr.add_argument("--model_dir", required=True)
    tr.add_argument("--src_lang", default=None, help="required by jaxmt-trained models")
    tr.add_argument("--tgt_lang", default=None,
                    help="required by jaxmt-trained and multilingual imported models")
    tr.add_argument("--input", default=None)
    tr.add_argument("--output", default=None)
    c = sub.add_parser("convert", help="import a Hugging Face T5 / mT5 / MarianMT checkpoint")
    c.add_argument("--from_hf", required=True, help="directory with config.json, weights and "
                   "tokenizer files")
    c.add_argument("--out", required=True, help="new jaxmt model directory")
    c.add_argument("--precision", default="fp32", help="ModelConfig.precision of the result")
    c.add_argument("--scan_layers", action="store_true", help="stack layers for nn.scan")
    c.add_argument("--input_prefix", default=None,
                   help="text before every source sentence; {src}/{tgt} become the language "
                        "codes (e.g. 'translate English to German: ' for T5)")
    return p


def main(argv: list[str] | None = None) -> int:
    from jaxmt.hostmem import keep_freed_memory
    keep_freed_memory()  # before any JAX computation; see jaxmt/hostmem.py
    argv = list(sys.argv[1:] if argv is None else argv)
    gin_overrides = [a for a in argv if a.startswith("--gin.")]
    rest = [a for a in argv if not a.startswith("--gin.")]
    args = build_parser().parse_args(rest)
    if gin_overrides and args.command != "train":
        raise SystemExit("error: --gin.NAME=VALUE applies to `jaxmt train` only")
    if args.command == "train":
        return cmd_train(args, gin_overrides)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "convert":
        return cmd_convert(args)
    return cmd_translate(args)


if __name__ == "__main__":
    sys.exit(main())
