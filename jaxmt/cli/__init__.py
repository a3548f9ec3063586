"""The ``jaxmt`` command: train, eval, translate, convert, export, data, vocab, quantize, prune,
distill, plan, profile.

    jaxmt train --gin_file=gin_configs/runs/demo.gin --gin.TRAIN_STEPS=100 --model_dir=runs/x
    jaxmt eval --model_dir=runs/x [--split=test] [--max_examples=N] [--json]
    jaxmt translate --model_dir=runs/x --src_lang=en --tgt_lang=de < in.txt > out.txt
    jaxmt translate --model_dir=runs/big --mesh=data=4,tensor=2 ...  # on a device mesh
    jaxmt convert --from_hf=opus-mt-en-de --out=runs/opus-en-de  # T5, mT5 or MarianMT
    jaxmt translate --model_dir=runs/opus-en-de < in.txt > out.txt
    jaxmt data validate --src_lang=en --tgt_lang=pt-BR corpus.tsv.gz [--json]
    jaxmt data mixture --gin_file=runs/demo.gin [--steps=N] [--model_dir=runs/x] [--json]
    jaxmt vocab train --out=v.model [--gin_file=RUN.gin | --langs=en,de --vocab_size=8000]
    jaxmt vocab report --vocab=v.model [--gin_file=RUN.gin | --langs=en,de] [--json]
    jaxmt quantize --model_dir=runs/x --out=runs/x-int8 [--mode=int8|w8a8]
    jaxmt prune --model_dir=runs/x --out=runs/x-small --structured=0.3  # or --sparsity=0.5
    jaxmt distill translate --teacher=runs/x --gin_file=runs/student.gin --out=runs/kd
    jaxmt plan --model=base --target=tpu-v5e:4x4 --batch=256 --src_len=512 --tgt_len=512
        [--verify=1] [--out=plan.gin] [--plot=plan.png] [--json]  # then train --gin_file=plan.gin
    jaxmt profile --model_dir=runs/demo [--steps=10] [--json]  # trace, breakdown, MFU, top ops

Multi-host training runs the same `jaxmt train` on every host, with the same
--model_dir (a shared filesystem) and --coordinator_address=HOST0:PORT
--num_processes=N --process_id=I (or JAX_* variables; SLURM and Cloud TPU are detected).

A mistake (a flag, a file, a model directory) is answered with one line on stderr,
``error: ...``, and a non-zero exit status; --debug anywhere on the command line (or
JAXMT_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from jaxmt.cli import (compress_commands, data_commands, model_commands, plan_commands,
                       profile_command, vocab_commands)
from jaxmt.cli.checks import describe, error_line
from jaxmt.sharding.multihost import CLUSTER_DETECTION  # jax only when initialising

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__all__ = ["CLUSTER_DETECTION", "build_parser", "main"]
DEBUG_FLAG = "--debug"
DEBUG_ENV = "JAXMT_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxmt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(DEBUG_FLAG, action="store_true", help="on an error, print the full "
                   f"traceback, not one line (also {DEBUG_ENV}=1); accepted anywhere")
    sub = p.add_subparsers(dest="command", required=True)
    model_commands.add_parsers(sub)
    data_commands.add_parser(sub)
    vocab_commands.add_parser(sub)
    compress_commands.add_parsers(sub)
    plan_commands.add_parsers(sub)
    profile_command.add_parser(sub)
    return p


def _run(argv: list[str]) -> int:
    from jaxmt.hostmem import keep_freed_memory
    keep_freed_memory()  # before any JAX computation; see jaxmt/hostmem.py
    gin_overrides = [a for a in argv if a.startswith("--gin.")]
    rest = [a for a in argv if not a.startswith("--gin.")]
    args = build_parser().parse_args(rest)
    if gin_overrides and not getattr(args, "takes_gin", False):
        raise SystemExit("error: --gin.NAME=VALUE applies to `jaxmt train`, `jaxmt vocab`, "
                         "`jaxmt data mixture`, `jaxmt data cache` and `jaxmt distill translate` "
                         "only")
    return args.func(args, gin_overrides)


def _quiet_library_noise() -> None:
    """Without --debug. A failed Orbax save (e.g. a full disk) reaches the user as one
    jaxmt line, but first Orbax's writer threads log ERRORs with tracebacks, asyncio
    logs the futures nobody awaited, and the closed event loop raises "unraisable"
    errors: drop those, and the tracebacks of other library log records."""
    from absl import logging as _  # noqa: F401  (the absl logger must be absl's own class)

    def absl_filter(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True

    def unraisable(u) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in
                str(u.exc_value)):
            sys.__unraisablehook__(u)

    logging.getLogger("absl").addFilter(absl_filter)
    logging.getLogger("asyncio").addFilter(
        lambda r: "exception was never retrieved" not in str(r.msg))
    sys.unraisablehook = unraisable


def main(argv: list[str] | None = None) -> int:
    """Runs one command; every error becomes one ``error: ...`` line (a SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not debug:
        _quiet_library_noise()
    try:
        return _run(argv)
    except SystemExit as e:
        if not isinstance(e.code, str):  # argparse's usage errors and --help, sys.exit(n)
            raise
        if debug and e.__context__ is not None:  # a message made from another error
            traceback.print_exception(e.__context__)
        raise SystemExit(error_line(e.code)) from None
    except BrokenPipeError:  # e.g. `jaxmt translate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as e:
        if debug:
            raise
        raise SystemExit(error_line(describe(e))) from None
