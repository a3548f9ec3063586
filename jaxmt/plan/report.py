"""What a plan shows: the ranked table, the plot, JSON rows, and the run gin file it writes.

The table lists the best candidates with their predicted memory and step time and the
reason each lost; the rest are counted by reason. The plot (PNG, matplotlib's Agg
backend) stacks each candidate's predicted memory by kind against the chip's memory and
shows its predicted step time. :func:`write_plan_gin` writes the recommended candidate as
a gin file that ``jaxmt train --gin_file`` takes as it is.
"""

from __future__ import annotations

import collections
import io

from jaxmt.fileio import write_atomic
from jaxmt.plan.candidates import GIB, Scored
from jaxmt.plan.targets import Target
from jaxmt.plan.workload import Candidate, Workload

TOP = 15


def settings(c: Candidate) -> dict:
    """A candidate's settings as JSON: the mesh by axis, then the other knobs."""
    return {"mesh": c.sizes, "shard_params": c.shard_params, "encoder_remat": c.encoder_remat,
            "decoder_remat": c.decoder_remat, "num_microbatches": c.num_microbatches,
            "attention": c.attention, "scan_layers": c.scan_layers, "label": c.label(),
            # remat="offload" keeps activations in pinned host memory (TPU/GPU only):
            # device memory as predicted, plus host transfers a CPU compile cannot check.
            "host_offload": c.offloads}


def row(s: Scored, rank: int) -> dict:
    """One ranked candidate as JSON: settings, predicted memory (total and parts, bytes
    per device) and step time, whether it fits, and why it lost ("" for the best)."""
    t = s.time
    return {"rank": rank, **settings(s.candidate),
            "predicted_bytes_per_device": int(s.memory.total),
            "memory": {k: int(v) for k, v in s.memory.parts().items()},
            "fits": s.fits, "predicted_step_s": t.total_s, "bound": t.bound,
            "compute_s": t.compute_s, "memory_s": t.memory_s, "collective_s": t.collective_s,
            "reason": s.reason}


def reason_counts(scored: list[Scored], start: int = 0) -> dict[str, int]:
    """How many of ``scored[start:]`` lost for each kind of reason, most first."""
    counts = collections.Counter(s.category for s in scored[start:])
    return dict(counts.most_common())


def table(scored: list[Scored], top: int = TOP) -> str:
    """The ranked table as text: the first ``top`` rows, then the rest counted by reason."""
    head = f"{'#':>3}  {'candidate':<54} {'memory':>9} {'fits':>4} {'step':>9} {'bound':<10} why"
    lines = [head, "-" * len(head)]
    for i, s in enumerate(scored[:top], 1):
        lines.append(f"{i:>3}  {s.candidate.label():<54} {size(s.memory.total):>9} "
                     f"{'yes' if s.fits else 'no':>4} {_seconds(s.time.total_s):>9} "
                     f"{s.time.bound:<10} {s.reason or 'best'}")
    rest = reason_counts(scored, top)
    if rest:
        lines.append(f"     ... and {sum(rest.values())} more: "
                     + ", ".join(f"{n} {why}" for why, n in rest.items()))
    return "\n".join(lines)


def size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def plot_rows(scored: list[Scored], fitting: int = 12, other: int = 6) -> list[tuple[int, Scored]]:
    """``(rank, candidate)`` pairs worth plotting: the best ``fitting`` ones that fit and
    the smallest ``other`` that do not, one per distinct prediction (scanned and
    unrolled layers, say, often predict the same)."""
    seen, fit, rest = set(), [], []
    for i, s in enumerate(scored, 1):
        key = (s.memory.total, round(s.time.total_s, 9))
        if key in seen:
            continue
        seen.add(key)
        (fit if s.fits else rest).append((i, s))
    return fit[:fitting] + rest[:other]


def plot(path: str, scored: list[Scored], target: Target, headroom: float, title: str) -> None:
    """Writes a PNG: per candidate (:func:`plot_rows`), predicted memory stacked by kind
    against the chip's memory and the usable share, and the predicted step time;
    candidates that do not fit are hatched and grey."""
    import matplotlib

    matplotlib.use("Agg")  # no display; before pyplot
    import matplotlib.pyplot as plt

    picked = plot_rows(scored)
    rows = [s for _, s in picked]
    x = list(range(len(rows)))
    fig, (mem_ax, time_ax) = plt.subplots(2, 1, figsize=(max(8.0, 0.55 * len(rows) + 3), 8),
                                          sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    bottom = [0.0] * len(rows)
    names = list(dict.fromkeys(k for s in rows for k in s.memory.parts()))  # stacking order
    colours = plt.get_cmap("tab10").colors
    for name, colour in zip(names, colours * 2):
        vals = [s.memory.parts().get(name, 0) / GIB for s in rows]
        mem_ax.bar(x, vals, bottom=bottom, color=colour, label=name, edgecolor="white",
                   linewidth=0.3)
        bottom = [b + v for b, v in zip(bottom, vals)]
    hbm = target.chip.hbm_bytes / GIB
    mem_ax.axhline(hbm, color="black", linewidth=1.2, label=f"device memory ({hbm:.0f} GiB)")
    mem_ax.axhline(hbm * headroom, color="black", linestyle="--", linewidth=1,
                   label=f"usable ({headroom:.0%})")
    for i, s in enumerate(rows):
        if not s.fits:
            mem_ax.bar(i, bottom[i], fill=False, hatch="//", edgecolor="grey", linewidth=0)
    mem_ax.set_ylabel("predicted memory per device (GiB)")
    mem_ax.set_ylim(0, max(max(bottom, default=0), hbm) * 1.1)
    mem_ax.legend(fontsize=7, ncol=4, loc="upper left")
    mem_ax.set_title(title, fontsize=10)
    times = [s.time.total_s * 1e3 for s in rows]
    time_ax.bar(x, times, color=["#55a868" if s.fits else "#bbbbbb" for s in rows])
    time_ax.set_ylabel("predicted step time (ms)")
    time_ax.set_xticks(x)
    time_ax.set_xticklabels([f"{i}. {s.candidate.label()}" for i, s in picked],
                            rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_plan_gin(path: str, w: Workload, c: Candidate, model_source: str, *,
                   notes: tuple[str, ...] = ()) -> None:
    """Writes the run gin file for candidate ``c`` of workload ``w``.

    ``jaxmt train --gin_file=PATH --model_dir=DIR`` takes it as it is: it includes the
    model, then sets the mesh, remat, scan, attention, precision, optimizer, batch,
    microbatches and lengths. Data (languages, corpora) keeps ``DataConfig``'s defaults.

    Args:
      path: the file to write (atomically).
      w: the workload planned (its model's precision and its optimizer are written).
      c: the candidate.
      model_source: what to ``include``: a name under gin_configs (``models/base.gin``)
        or an absolute path.
      notes: comment lines for the header (what was planned, the prediction).
    """
    r, d, f, t = c.mesh
    quote = lambda v: '"' + v + '"'  # noqa: E731  (gin strings)
    lines = [
        "# Written by `jaxmt plan`; train with",
        f"#   jaxmt train --gin_file={path} --model_dir=DIR",
        *(f"# {n}" for n in notes),
        "# Macros this file needs (override with --gin.NAME=VALUE):",
        "#   TRAIN_STEPS  optimizer steps",
        "#   BATCH_SIZE   global batch, in rows (the mesh and microbatches below divide it)",
        "#   SRC_LEN      source tokens per row",
        "#   TGT_LEN      target tokens per row",
        "# The model comes first, so that the settings below override any it makes.",
        f"include '{model_source}'",
        "",
        f"TRAIN_STEPS = {w.train.steps}",
        f"BATCH_SIZE = {w.batch}",
        f"SRC_LEN = {w.src_len}",
        f"TGT_LEN = {w.tgt_len}",
        "",
        f"MeshConfig.replica = {r}",
        f"MeshConfig.data = {d}",
        f"MeshConfig.fsdp = {f}",
        f"MeshConfig.tensor = {t}",
        f"MeshConfig.shard_params = {c.shard_params}",
        "",
        f"ModelConfig.precision = {quote(w.model.precision)}",
        f"ModelConfig.encoder_remat = {quote(c.encoder_remat)}",
        f"ModelConfig.decoder_remat = {quote(c.decoder_remat)}",
        f"ModelConfig.scan_layers = {c.scan_layers}",
        f"AttentionConfig.encoder = {quote(c.attention)}",
        f"AttentionConfig.decoder = {quote(c.attention)}",
        "",
        "DataConfig.src_len = %SRC_LEN",
        "DataConfig.tgt_len = %TGT_LEN",
        "",
        "TrainConfig.steps = %TRAIN_STEPS",
        "TrainConfig.batch_size = %BATCH_SIZE",
        f"TrainConfig.num_microbatches = {c.num_microbatches}",
        f"TrainConfig.optimizer = {quote(w.train.optimizer)}",
    ]
    write_atomic(path, "\n".join(lines) + "\n")
