"""`jaxmt profile`: where a trained model's step time goes, measured under jax.profiler.

    jaxmt profile --model_dir=runs/demo [--steps=10] [--warmup=2] [--json]

Runs training steps of the directory's configuration (its latest checkpoint's state,
in memory; nothing is saved) and writes the trace into DIR/profile; see
jaxmt/plan/profile.py for what is measured and how the bottleneck is named.
"""

from __future__ import annotations

import json
import os


def check_args(args) -> None:
    """The flags and the model directory, before JAX is imported; a mistake exits with
    one line naming it."""
    from jaxmt import config as cfglib

    flag = f"--model_dir={args.model_dir}"
    if args.steps < 1:
        raise SystemExit(f"error: --steps={args.steps}: must be at least 1 (training steps to "
                         "profile, after the warm-up)")
    if args.warmup < 1:
        raise SystemExit(f"error: --warmup={args.warmup}: must be at least 1 (the first step "
                         "compiles, and is never timed)")
    if not os.path.isdir(args.model_dir):
        what = "a file, not a directory" if os.path.exists(args.model_dir) else "no such directory"
        raise SystemExit(f"error: {flag}: {what}; pass a directory written by `jaxmt train`")
    if not os.path.exists(os.path.join(args.model_dir, cfglib.CONFIG_FILE)):
        raise SystemExit(f"error: {flag}: not a model directory (no {cfglib.CONFIG_FILE}); pass "
                         "a directory written by `jaxmt train`")
    try:
        cfgs = cfglib.load(args.model_dir)
    except ValueError as e:  # the message names the file and the field
        raise SystemExit(f"error: {e}") from None
    missing = [s for s in ("model", "data", "train") if s not in cfgs]
    if missing:
        raise SystemExit(f"error: {flag}: its {cfglib.CONFIG_FILE} has no {', '.join(missing)} "
                         "section (an imported model?); `jaxmt profile` replays a `jaxmt "
                         "train` run: fine-tune it with --init_from first")
    if cfgs["train"].distill.teacher:
        raise SystemExit(f"error: {flag}: a distillation run (TrainConfig.distill.teacher="
                         f"{cfgs['train'].distill.teacher!r}); `jaxmt profile` does not replay "
                         "its teacher yet")


def cmd_profile(args, gin_overrides) -> int:
    check_args(args)
    from jaxmt.plan.profile import format_report, profile

    report = profile(args.model_dir, steps=args.steps, warmup=args.warmup,
                     progress=not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def add_parser(sub) -> None:
    """The ``profile`` subcommand."""
    p = sub.add_parser("profile", help="profile training steps of a model directory: step-time "
                       "breakdown, MFU, top ops, bottleneck; trace in DIR/profile")
    p.add_argument("--model_dir", required=True,
                   help="a directory written by `jaxmt train`; only DIR/profile is written")
    p.add_argument("--steps", type=int, default=10, help="steps to profile (default 10)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first: the compile and the pipeline's start (default 2)")
    p.add_argument("--json", action="store_true", help="last line is one JSON object")
    p.set_defaults(func=cmd_profile)
