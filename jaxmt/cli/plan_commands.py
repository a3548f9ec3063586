"""`jaxmt plan`: which mesh, remat, microbatches, attention and layer form to train a model
with on given hardware, before spending an hour of it (jaxmt/plan/).

Every argument is checked before JAX is imported. The analytic pass (memory and step
time for every candidate) compiles nothing; ``--verify K`` then compiles the best K ahead
of time for the target and reports predicted against compiled memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time

PRECISIONS = ("bf16", "fp32", "bf16_params", "fp16")
OPTIMIZERS = ("adafactor", "adamw")
GIB = 2 ** 30
VERIFY_RETRIES = 4  # compiles beyond --verify when the best ones do not fit


def _presets() -> list[str]:
    from jaxmt.gin_files import GIN_DIR
    return sorted(p.stem for p in (GIN_DIR / "models").glob("*.gin"))


def model_source(name: str) -> tuple[str, str]:
    """``(file to read, what plan.gin includes)`` for ``--model``: a preset name
    (``base``: ``models/base.gin``) or a gin file (under gin_configs: that name; else its
    absolute path, so the plan works from any folder). Exits with one line otherwise."""
    from pathlib import Path

    from jaxmt.gin_files import GIN_DIR

    presets = _presets()
    if name in presets:
        return str(GIN_DIR / "models" / f"{name}.gin"), f"models/{name}.gin"
    if name.endswith(".gin") or os.sep in name:
        for cand in (Path(name), GIN_DIR / name):
            if cand.is_file():
                path = cand.resolve()
                try:
                    return str(path), str(path.relative_to(GIN_DIR.resolve()))
                except ValueError:
                    return str(path), str(path)
        raise SystemExit(f"error: --model={name}: no such gin file (also looked in {GIN_DIR})")
    raise SystemExit(f"error: --model={name}: unknown model; give a preset ({', '.join(presets)})"
                     " or a gin file (PATH.gin)")


def _check_output(flag: str, path: str | None) -> None:
    """``--out``/``--plot`` must name a file whose folder exists or can be made."""
    if path is None:
        return
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise SystemExit(f"error: {flag}={path}: a directory; give a file name")
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag}={path}: cannot write there ({parent} is not a "
                         "writable directory)")


def check_args(args):
    """Every flag checked without JAX; returns the parsed target and the batch in rows."""
    from jaxmt.plan.targets import parse_target

    for flag in ("src_len", "tgt_len"):
        v = getattr(args, flag)
        if v <= 0:
            raise SystemExit(f"error: --{flag}={v}: must be a positive number of tokens per row")
    if (args.batch is None) == (args.batch_tokens is None):
        raise SystemExit("error: --batch and --batch_tokens: give exactly one (--batch=ROWS, or "
                         "--batch_tokens=N: source plus target tokens per step)")
    row = args.src_len + args.tgt_len
    if args.batch is not None and args.batch <= 0:
        raise SystemExit(f"error: --batch={args.batch}: must be a positive number of rows")
    if args.batch_tokens is not None and args.batch_tokens < row:
        raise SystemExit(f"error: --batch_tokens={args.batch_tokens}: must be at least one row "
                         f"of --src_len + --tgt_len = {row} tokens")
    if not 0.0 < args.headroom <= 1.0:
        raise SystemExit(f"error: --headroom={args.headroom}: must be a fraction in (0, 1], "
                         "the share of device memory a plan may use (e.g. 0.9)")
    if args.verify < 0:
        raise SystemExit(f"error: --verify={args.verify}: must be >= 0 (the best candidates to "
                         "compile; 0: none)")
    _check_output("--out", args.out)
    _check_output("--plot", args.plot)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"error: --plot={args.plot}: needs matplotlib (pip install matplotlib)")
    try:
        target = parse_target(args.target)
    except ValueError as e:
        raise SystemExit(f"error: --target={args.target}: {e}") from None
    batch = args.batch if args.batch is not None else args.batch_tokens // row
    return target, batch


def _workload(model_file: str, args, batch: int):
    """The model of ``model_file`` (a preset or run gin, read without JAX) at
    ``--precision``, with ``--optimizer`` and the batch."""
    import gin

    from jaxmt import config as cfglib
    from jaxmt.gin_files import parse_gin
    from jaxmt.plan.workload import Workload

    gin.clear_config()  # only this file's bindings (the process may have parsed others)
    try:
        parse_gin([model_file], [], configs_only=True)
        model = dataclasses.replace(cfglib.ModelConfig(), precision=args.precision)
        train = dataclasses.replace(cfglib.TrainConfig(), batch_size=batch, num_microbatches=1,
                                    optimizer=args.optimizer)
    finally:
        gin.clear_config()
    return Workload(model, train, args.src_len, args.tgt_len)


def _fake_cpu_devices(n: int) -> None:
    """``cpu:N``: N fake devices, which XLA reads from XLA_FLAGS when JAX loads."""
    if "jax" in sys.modules:
        return  # too late: verification checks the device count itself
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _verification_blocker(target) -> str | None:
    """Why no ahead-of-time compile for ``target`` can run here (None: it can)."""
    if target.kind == "tpu" and importlib.util.find_spec("libtpu") is None:
        return ("libtpu is not installed; install the TPU compiler with "
                "`pip install -e '.[tpu_aot]'`")
    return None


def _compile(w, target, devices, s, rank: int, progress) -> dict:
    """One verification compile of candidate ``s`` (ranked ``rank``), as a JSON dict."""
    from jaxmt.plan.report import size
    from jaxmt.plan.verify import compile_candidate

    progress(f"verifying #{rank} {s.candidate.label()}: compiling for {target.text} ahead of "
             "time ...")
    entry = {"rank": rank, "label": s.candidate.label(),
             "predicted_bytes_per_device": int(s.memory.total)}
    try:
        got = compile_candidate(w, s.candidate, target, devices)
    except Exception as e:  # an OOM at compile time (TPU), a compiler failure
        text = f"{type(e).__name__}: " + " ".join(str(e).split())[:300]
        entry.update(compiled=False, fits=False, error=text,
                     out_of_memory="RESOURCE_EXHAUSTED" in text)
        progress(f"  failed to compile: {text}")
        return entry
    compiled = int(got["compiled_bytes_per_device"])
    # On TPU, XLA refuses a program that does not fit in HBM (RESOURCE_EXHAUSTED, above),
    # so a compile is a fit. Neither its sum nor its peak is the test: base on v5e:4x4
    # compiled with a 16.99 GiB sum, and with remat="offload" the peak counts the host
    # copies (1B on v5e:4x4 compiled with a 29.59 GiB peak). Elsewhere, the sum.
    tpu = target.kind == "tpu"
    fits = tpu or compiled <= target.chip.hbm_bytes
    entry.update(got, compiled=True, compiled_bytes_per_device=compiled, fits=fits,
                 fit_check="XLA's TPU compile (it refuses what does not fit)" if tpu
                 else "compiled bytes against device memory", out_of_memory=not fits,
                 relative_error=(s.memory.total - compiled) / compiled if compiled else None)
    peak = got.get("peak_bytes", 0)
    progress(f"  compiled in {got.get('compile_s', 0):.0f}s: {size(compiled)} per device "
             f"(predicted {size(s.memory.total)}, {entry['relative_error']:+.1%}); "
             + (f"XLA's peak {size(peak)}; " if tpu and peak else "")
             + ("fits" if fits else f"does NOT fit in {size(target.chip.hbm_bytes)}"))
    return entry


def _verify(w, target, devices, scored, k: int, headroom: float, progress):
    """Compiles the best candidates for ``target`` (on ``devices``, its devices here)
    until ``k`` fit. After one does not fit when compiled, the candidates are enumerated
    and ranked again with what that taught: the usable memory lowered to below its
    prediction, or, when it used remat="offload" (whose device memory the prediction
    misses), without offload. At most ``k`` + :data:`VERIFY_RETRIES` compiles.

    Returns:
      The final ranking, one dict per compile, and the usable share of device memory
      the ranking ended with.
    """
    import gc

    import jax

    from jaxmt.config import REMAT_POLICIES
    from jaxmt.plan.candidates import enumerate_candidates, rank
    from jaxmt.plan.report import size

    hbm = target.chip.hbm_bytes
    rejected, verified, remat = {}, [], None
    while sum(v["fits"] for v in verified) < k and len(verified) < k + VERIFY_RETRIES:
        tried = {v["label"] for v in verified}
        at = next((i for i, s in enumerate(scored) if s.fits and s.candidate not in rejected
                   and s.candidate.label() not in tried), None)
        if at is None:
            break
        s = scored[at]
        entry = _compile(w, target, devices, s, at + 1, progress)
        jax.clear_caches()  # each compile's programs (GBs for a TPU target) are done with
        gc.collect()
        verified.append(entry)
        if entry["fits"]:
            continue
        rejected[s.candidate] = (
            f"does not fit when compiled: {size(entry['compiled_bytes_per_device'])} per device"
            if entry["compiled"] else f"failed to compile: {entry['error'][:160]}")
        if entry["out_of_memory"] and s.candidate.offloads:
            remat = tuple(p for p in REMAT_POLICIES if p != "offload")
            progress("  ranking again without remat=offload")
        elif entry["out_of_memory"]:
            headroom = min(headroom, (s.memory.total - 2**20) / hbm)
            progress(f"  ranking again with candidates predicted under {size(s.memory.total)}")
        cands = enumerate_candidates(w, target, headroom=headroom, remat=remat)
        known = set(cands)
        cands += [c for c in rejected if c not in known]  # shown with their reasons
        scored = rank(w, target, cands, headroom, rejected)
    return scored, verified, headroom


def _verify_best(w, target, scored, args, progress):
    """``_verify`` where the target can be compiled for here; else one line saying why."""
    blocker, devices = _verification_blocker(target), None
    if blocker is None:
        from jaxmt.plan.verify import target_devices
        try:
            devices = target_devices(target)
        except ValueError as e:
            blocker = str(e)
    if blocker:
        progress(f"verification skipped: {blocker}")
        return scored, [], args.headroom
    first = scored[0].candidate
    scored, verified, headroom = _verify(w, target, devices, scored, args.verify,
                                         args.headroom, progress)
    if not scored[0].reason and scored[0].candidate != first:
        progress(f"recommending {scored[0].candidate.label()} instead: the better ones did not "
                 "compile within the device's memory")
    return scored, verified, headroom


def _summary(args, w, target, scored, best, verified, analytic_s: float, ok: bool,
             headroom: float) -> dict:
    """The ``--json`` object (``headroom``: the usable share verification ended with)."""
    from jaxmt.plan import report

    rec = report.row(best, scored.index(best) + 1)
    for v in verified:
        if v["label"] == rec["label"] and v.get("compiled"):
            rec.update(compiled_bytes_per_device=v["compiled_bytes_per_device"],
                       compiled_fits=v["fits"], relative_error=v["relative_error"])
    return {"target": target.text, "model": args.model, "chip": target.chip.name,
            "workload": {"batch": w.batch, "src_len": w.src_len, "tgt_len": w.tgt_len,
                         "tokens": w.tokens, "precision": w.model.precision,
                         "optimizer": w.train.optimizer},
            "candidates": len(scored), "analytic_s": round(analytic_s, 3),
            "device_bytes": target.chip.hbm_bytes, "headroom": args.headroom,
            "verified_headroom": headroom, "recommended": rec,
            "rejected": report.reason_counts([s for s in scored if s is not best]),
            "table": [report.row(s, i) for i, s in enumerate(scored[:report.TOP], 1)],
            "verified": verified, "plot": args.plot, "out": args.out if ok else None}


def cmd_plan(args, gin_overrides) -> int:
    """Checks the arguments (no JAX), ranks the candidates analytically, verifies the
    best by compiling, then prints/writes the table, plot, plan gin and JSON."""
    target, batch = check_args(args)
    model_file, include = model_source(args.model)
    progress = lambda msg: print(msg, flush=True)  # noqa: E731
    w = _workload(model_file, args, batch)
    if target.kind == "cpu":
        _fake_cpu_devices(target.num_devices)
    from jaxmt.plan import report
    from jaxmt.plan.candidates import enumerate_candidates, rank

    t0 = time.perf_counter()
    try:
        cands = enumerate_candidates(w, target, headroom=args.headroom)
    except ValueError as e:
        raise SystemExit(f"error: --model={args.model} --target={args.target} --batch={batch}: "
                         f"{e}") from None
    scored = rank(w, target, cands, headroom=args.headroom)
    analytic_s = time.perf_counter() - t0
    title = (f"{args.model} on {target.text} ({target.chip.name}): batch {batch} x "
             f"({w.src_len} + {w.tgt_len}), {w.model.precision}, {w.train.optimizer}")
    progress(f"plan: {title}")
    if args.batch_tokens is not None:
        progress(f"--batch_tokens={args.batch_tokens}: {batch} rows of {w.src_len} + "
                 f"{w.tgt_len} tokens ({w.tokens} tokens per step)")
    progress(f"{len(scored)} candidates ranked in {analytic_s:.1f}s (analytic, no compiles)")
    progress(report.table(scored))
    verified, headroom = [], args.headroom
    if args.verify and not scored[0].reason:
        scored, verified, headroom = _verify_best(w, target, scored, args, progress)
    best = scored[0]
    ok = not best.reason  # the fastest that fits (and compiled within memory, if verified)
    if ok:
        progress(f"recommended: {best.candidate.label()}: {report.size(best.memory.total)} per "
                 f"device of {report.size(target.chip.hbm_bytes)}, "
                 f"{best.time.total_s * 1e3:.1f} ms per step ({best.time.bound}-bound)")
        if args.out:
            notes = (f"Planned for {title}.",
                     f"Recommended: {best.candidate.label()}: predicted "
                     f"{report.size(best.memory.total)} per device, "
                     f"{best.time.total_s * 1e3:.1f} ms per step.")
            report.write_plan_gin(args.out, w, best.candidate, include, notes=notes)
            progress(f"wrote {args.out}")
    if args.plot:
        report.plot(args.plot, scored, target, headroom, title)
        progress(f"wrote {args.plot}")
    if args.json:
        print(json.dumps(_summary(args, w, target, scored, best, verified, analytic_s, ok,
                                  headroom)), flush=True)
    if not ok:
        usable = report.size(headroom * target.chip.hbm_bytes)
        why = (f"none of the {len(verified)} compiled fit in {report.size(target.chip.hbm_bytes)}"
               if best.fits else f"the smallest candidate ({best.candidate.label()}) needs "
               f"{report.size(best.memory.total)} per device of {usable} usable")
        raise SystemExit(f"error: nothing fits on {target.text}: {why}; use more or larger "
                         "devices, a smaller --batch or shorter lengths"
                         + ("; --out not written" if args.out else ""))
    return 0


def add_parsers(sub) -> None:
    """`jaxmt plan` (and, later, `jaxmt profile`)."""
    p = sub.add_parser("plan", help="choose the mesh, remat, microbatches, attention and "
                       "layer form for a model on given hardware (analytic; --verify compiles)")
    p.add_argument("--model", required=True,
                   help="a preset (tiny, small, base, transformer_base, ...) or a gin file "
                        "PATH.gin that sets ModelConfig (a run gin works too)")
    p.add_argument("--target", required=True,
                   help="the hardware: cpu:8, tpu-v5e:4x4, tpu-v5e:16x16, tpu-v5p:2x2x2, "
                        "tpu-v4:2x2x4, h100:8, h100:8x4 (4 hosts of 8), ...")
    p.add_argument("--batch", type=int, default=None, help="global batch, in rows")
    p.add_argument("--batch_tokens", type=int, default=None,
                   help="global batch in tokens (source plus target); rows = this / "
                        "(src_len + tgt_len), rounded down")
    p.add_argument("--src_len", type=int, required=True, help="source tokens per row")
    p.add_argument("--tgt_len", type=int, required=True, help="target tokens per row")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="ModelConfig.precision (default: bf16)")
    p.add_argument("--optimizer", default="adafactor", choices=OPTIMIZERS,
                   help="TrainConfig.optimizer (default: adafactor)")
    p.add_argument("--verify", type=int, default=1,
                   help="compile the best K candidates ahead of time for the target and "
                        "report compiled against predicted memory (default 1; 0: none; "
                        "a TPU compile takes 1-2 minutes here)")
    p.add_argument("--headroom", type=float, default=0.9,
                   help="the share of device memory a candidate may use (default 0.9)")
    p.add_argument("--out", default=None,
                   help="write the recommended settings as a run gin file for "
                        "`jaxmt train --gin_file`")
    p.add_argument("--plot", default=None,
                   help="write a PNG: memory breakdown and step time per candidate")
    p.add_argument("--json", action="store_true", help="print one JSON object (the last line)")
    p.set_defaults(func=cmd_plan)
