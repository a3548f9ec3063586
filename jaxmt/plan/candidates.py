"""Which settings a plan considers (:func:`enumerate_candidates`), and which wins (:func:`rank`).

Enumeration walks the mesh shapes ``(replica, data, fsdp, tensor)`` the device count
factors into, keeping those the model's dimensions and the batch divide (the same
checks :class:`~jaxmt.sharding.partitioning.Partitioner` applies before a compile) and
the target's network allows: ``replica`` only across hosts, ``tensor`` only within one
(a slice, for TPUs). For each mesh it adds ZeRO-1 or FSDP, the attention
implementations the target runs natively, and scanned or unrolled layers. Remat and
microbatches only cost time, so they are tried only where the memory needs them: no
remat at one microbatch first; the remat policies (per stack) when that does not fit;
more microbatches only when no remat policy fits with fewer. A remat pair that
recomputes at least as much in both stacks as one that already fits is left out.

Ranking predicts memory (:func:`jaxmt.plan.memory.predict_memory`) and step time
(:func:`jaxmt.plan.step_time.predict_step_time`) for every candidate, analytically: no
compiles. The best is the fastest that fits within ``headroom`` of the chip's memory,
ties broken toward less memory; every other candidate gets the reason it lost.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

from jaxmt.config import REMAT_POLICIES
from jaxmt.plan.memory import MemoryEstimate, predict_memory
from jaxmt.plan.step_time import StepTime, predict_step_time
from jaxmt.plan.targets import Target
from jaxmt.plan.workload import Candidate, Workload
from jaxmt.sharding.partitioning import check_batch_split, check_model_split

GIB = 2 ** 30
MICROBATCHES = (1, 2, 4, 8)
# Recomputation per policy, for the order remat pairs are tried in and for dominance:
# nothing; element-wise work around the saved matmuls (offload: the same, plus copies to
# and from host memory); everything but the attention outputs; the whole forward.
RECOMPUTE = {"none": 0, "dots_saveable": 1, "offload": 1, "save_attention_out": 2, "full": 3}
# The policies that keep the least in device memory: a stack under them saves only its
# layers' inputs (offload moves the rest to host memory).
LEANEST = ("full", "offload")
# Self-attention implementations per target kind. On CPU ``flash`` runs ``blockwise``
# (the Pallas kernel is interpret-only there) and ``dot_product`` is XLA's; on TPU
# ``dot_product`` is XLA's too; only CUDA GPUs have cuDNN's fused attention.
ATTENTIONS = {"cpu": ("xla", "blockwise"), "tpu": ("xla", "flash", "blockwise"),
              "gpu": ("xla", "dot_product", "flash", "blockwise")}
# Kinds with pinned host memory, where ModelConfig.*_remat = "offload" can run.
OFFLOAD_KINDS = ("tpu", "gpu")
ATTENTION_PREFERENCE = ("flash", "dot_product", "xla", "blockwise")  # on equal predictions
COLLECTIVE_BOUND = 0.3  # a losing candidate whose collectives take this share is called so
WHY = {  # what a setting costs, in a losing candidate's reason
    "full": "remat=full recomputes the forward",
    "save_attention_out": "remat=save_attention_out recomputes all but the attention outputs",
    "dots_saveable": "remat=dots_saveable recomputes the element-wise work",
    "offload": "remat=offload copies the matmul outputs to host memory and back",
}


def mesh_shapes(w: Workload, target: Target) -> list[tuple[int, int, int, int]]:
    """Every ``(replica, data, fsdp, tensor)`` over the target's devices that the model
    and the batch (at one microbatch) divide and the target's network allows."""
    n = target.num_devices
    # replica is data parallelism over the slow network (DCN, InfiniBand): across TPU
    # slices or GPU hosts. tensor all-reduces every layer's activations: within one.
    replicas = _divisors(target.num_domains)
    per_domain = target.devices_per_domain
    out = []
    for r in replicas:
        for t in _divisors(per_domain):
            for f in _divisors(n // (r * t)):
                d = n // (r * t * f)
                sizes = {"replica": r, "data": d, "fsdp": f, "tensor": t}
                try:
                    check_model_split(w.model, sizes)
                    check_batch_split(w.batch, r * d * f)
                except ValueError:
                    continue
                out.append((r, d, f, t))
    return out


def enumerate_candidates(w: Workload, target: Target, *, attentions: tuple[str, ...] | None = None,
                         max_microbatches: int = 8, headroom: float = 0.9,
                         scan: tuple[bool, ...] = (False, True),
                         remat: tuple[str, ...] | None = None) -> list[Candidate]:
    """The candidates worth ranking for ``w`` on ``target``.

    Args:
      w: the workload (its model's remat, attention and scan settings are replaced).
      target: the hardware.
      attentions: self-attention implementations to try (default: the target's,
        :data:`ATTENTIONS`).
      max_microbatches: the most gradient-accumulation steps to try (powers of two).
      headroom: the share of the chip's memory a candidate may use to count as fitting
        (decides where remat and microbatches are tried).
      scan: scanned and/or unrolled layer stacks.
      remat: the remat policies to try per stack (default: ``REMAT_POLICIES``, without
        ``offload`` where the target has no pinned host memory).

    Returns:
      Candidates, each mesh's in the order tried.

    Raises:
      ValueError: no mesh shape divides the model and the batch over the target's devices.
    """
    attentions = attentions or ATTENTIONS[target.kind]
    limit = headroom * target.chip.hbm_bytes
    policies = sorted((p for p in remat or REMAT_POLICIES
                       if p != "offload" or target.kind in OFFLOAD_KINDS), key=RECOMPUTE.get)
    pairs = sorted(itertools.product(policies, policies),
                   key=lambda p: (RECOMPUTE[p[0]] + RECOMPUTE[p[1]], p))
    meshes = mesh_shapes(w, target)
    if not meshes:
        raise ValueError(f"no mesh over the {target.num_devices} devices of {target.text} "
                         f"splits this model and batch {w.batch}: the tensor axis must divide "
                         f"num_heads={w.model.num_heads}, mlp_dim={w.model.mlp_dim} and "
                         f"vocab_size={w.model.vocab_size}, the fsdp axis emb_dim="
                         f"{w.model.emb_dim}, and replica x data x fsdp the batch")
    out = []
    for mesh, attention, scan_layers in itertools.product(meshes, attentions, scan):
        for shard in ((True, False) if mesh[2] > 1 else (True,)):
            base = Candidate(mesh=mesh, shard_params=shard, attention=attention,
                             scan_layers=scan_layers)
            out += _remat_and_microbatches(w, target, base, pairs, limit, max_microbatches)
    return out


def _remat_and_microbatches(w: Workload, target: Target, base: Candidate, pairs,
                            limit: float, max_microbatches: int) -> list[Candidate]:
    """``base`` at the fewest microbatches where some remat pair fits, with the remat
    pairs not dominated by a fitting one; no remat alone where that fits. At counts
    where nothing fits, only no remat and the pairs that save the most (to show why)."""
    out = []
    dp = base.mesh[0] * base.mesh[1] * base.mesh[2]
    leanest = [p for p in pairs if p[0] == p[1] and p[0] in LEANEST] or pairs[-1:]
    for mb in (m for m in MICROBATCHES if m <= max_microbatches):
        try:
            check_batch_split(w.batch, dp, mb)
        except ValueError:
            break
        at = lambda enc, dec: dataclasses.replace(  # noqa: E731
            base, encoder_remat=enc, decoder_remat=dec, num_microbatches=mb)
        fits = lambda c: memory(w, c, target).total <= limit  # noqa: E731
        if not fits(at("none", "none")) and not any(fits(at(*p)) for p in leanest):
            out += [at("none", "none")] + [at(*p) for p in leanest]
            continue  # memory falls with remat: nothing fits at this count
        fitting = []
        for enc, dec in pairs:
            if any(RECOMPUTE[enc] >= RECOMPUTE[e] and RECOMPUTE[dec] >= RECOMPUTE[d]
                   for e, d in fitting):
                continue  # recomputes at least as much as a pair that already fits
            c = at(enc, dec)
            out.append(c)
            if fits(c):
                fitting.append((enc, dec))
        break
    return out


def memory(w: Workload, c: Candidate, target: Target) -> MemoryEstimate:
    """:func:`predict_memory` on ``target`` (TPU: tiled layouts), computed once per
    workload, candidate and kind of target (enumeration and ranking both ask)."""
    return _memory(w, c, target.kind)


@functools.lru_cache(maxsize=1 << 16)
def _memory(w: Workload, c: Candidate, kind: str) -> MemoryEstimate:
    return predict_memory(w, c, kind)


@dataclasses.dataclass(frozen=True)
class Scored:
    """One ranked candidate.

    Attributes:
      candidate: the setting.
      memory: its predicted per-device memory.
      time: its predicted step time.
      fits: ``memory.total <= headroom * chip memory``.
      reason: why it is not the best ("" for the best): "does not fit: ...",
        "collective-bound: ...", "slower: ...".
    """

    candidate: Candidate
    memory: MemoryEstimate
    time: StepTime
    fits: bool
    reason: str = ""

    @property
    def category(self) -> str:
        """The reason's kind, for counts: "does not fit", "collective-bound", "slower"."""
        return self.reason.partition(":")[0] if self.reason else "best"


def rank(w: Workload, target: Target, candidates: list[Candidate], headroom: float = 0.9,
         rejected: dict[Candidate, str] | None = None) -> list[Scored]:
    """Candidates scored and sorted: those that fit first, fastest first (ties: less
    memory), then those ``rejected``, then those that do not fit, smallest first. The
    first is the best when it fits; each other one carries the reason it lost.

    Args:
      rejected: candidates ruled out after an earlier ranking (e.g. their compile did not
        fit), with the reason each gets.
    """
    rejected = rejected or {}
    limit = headroom * target.chip.hbm_bytes
    scored = []
    for c in candidates:
        m = memory(w, c, target)
        scored.append(Scored(c, m, predict_step_time(w, c, target), m.total <= limit))
    # Among equal times, remat="offload" last: the step-time model has no term for its
    # transfers to host memory, so its memory saving looks free. Then less compute: a
    # step bound by memory traffic or collectives hides the attention kernels'
    # difference, and flash and blockwise trace to the same residuals, though on TPU
    # blockwise compiled to 49% more memory (base, v5e:4x4: 16.99 against 11.39 GiB).
    group = lambda s: 2 if not s.fits else int(s.candidate in rejected)  # noqa: E731
    scored.sort(key=lambda s: (group(s), s.time.total_s if s.fits else s.memory.total,
                               s.candidate.offloads, s.time.compute_s, s.memory.total,
                               *_preference(s.candidate)))
    best = scored[0] if scored and group(scored[0]) == 0 else None
    return [s if s is best else dataclasses.replace(
        s, reason=rejected.get(s.candidate) or _reason(s, best, limit, target)) for s in scored]


def _preference(c: Candidate) -> tuple:
    """Order among equal predictions: fewer microbatches, a fused attention kernel, FSDP
    over ZeRO-1, scanned layers (they compile faster), then the label."""
    return (c.num_microbatches, ATTENTION_PREFERENCE.index(c.attention), not c.shard_params,
            not c.scan_layers, c.label())


def _reason(s: Scored, best: Scored | None, limit: float, target: Target) -> str:
    if not s.fits:
        chip = target.chip.hbm_bytes
        return (f"does not fit: needs {s.memory.total / GIB:.1f} GiB of {chip / GIB:.3g} GiB"
                + (f" ({limit / chip:.0%} usable)" if limit < chip else ""))
    ratio = s.time.total_s / best.time.total_s if best and best.time.total_s > 0 else 1.0
    share = _collective_share(s)
    if share >= COLLECTIVE_BOUND and share > _collective_share(best) + 0.05:
        return (f"collective-bound: {share:.0%} of the step in {_main_collective(s)}"
                f" ({ratio:.2f}x the best)")
    why = _difference(s.candidate, best.candidate) if best else ""
    if ratio <= 1.0 + 1e-9:
        extra = s.memory.total - best.memory.total
        if s.candidate.offloads and not best.candidate.offloads:
            return ("ties: the same predicted time, but remat=offload's transfers to host "
                    "memory are not in it")
        if s.time.compute_s > best.time.compute_s * (1 + 1e-9):
            more = s.time.compute_s / best.time.compute_s - 1
            return (f"ties: the same predicted time, but {more:.1%} more compute"
                    + (f" ({why})" if why else ""))
        return ("ties: the same predicted time, " + (
            f"{extra / GIB:.2f} GiB more memory per device" if extra >= 2**20
            else f"memory, with {why or 'the same settings'}"))
    slower = f"{ratio:.2f}x the best" if ratio >= 1.1 else f"+{ratio - 1:.1%} over the best"
    return f"slower: {slower}" + (f" ({why})" if why else "")


def _collective_share(s: Scored | None) -> float:
    """The share of the step spent waiting on collectives (those not hidden)."""
    return s.time.exposed_collective_s / s.time.total_s if s and s.time.total_s > 0 else 0.0


def _main_collective(s: Scored) -> str:
    """The largest collective of a step, e.g. "fsdp all-gathers"."""
    if not s.time.collectives:
        return "collectives"
    axis = max(s.time.collectives, key=lambda a: s.time.collectives[a]["seconds"])
    link = " over DCN/InfiniBand" if s.time.collectives[axis]["link"] == "inter" else ""
    what = {"tensor": "tensor all-reduces of activations",
            "fsdp": ("fsdp all-gathers and reduce-scatters" if s.candidate.shard_params
                     else "zero1 gradient reduce-scatters"),
            "data": "data-parallel gradient all-reduces",
            "replica": "replica gradient all-reduces"}[axis]
    return what + link


def _difference(c: Candidate, best: Candidate) -> str:
    """What ``c`` does that costs time where ``best`` does not, as one clause."""
    for stack, mine, theirs in (("encoder", c.encoder_remat, best.encoder_remat),
                                ("decoder", c.decoder_remat, best.decoder_remat)):
        if RECOMPUTE[mine] > RECOMPUTE[theirs]:
            text = WHY[mine]
            return text if c.encoder_remat == c.decoder_remat else f"{stack} {text}"
    if c.num_microbatches > best.num_microbatches:
        return (f"mb={c.num_microbatches} runs {c.num_microbatches} smaller matmuls"
                + (" and gathers the fsdp weights each time" if c.mesh[2] > 1 else ""))
    names = ("replica", "data", "fsdp", "tensor")
    changed = [f"{n}={a}" for n, a, b in zip(names, c.mesh, best.mesh) if a != b]
    if changed:
        what = {"tensor": "all-reduces activations", "fsdp": "gathers weights",
                "replica": "all-reduces gradients over the slower network",
                "data": "all-reduces gradients"}
        axis = next(n for n, a, b in zip(names, c.mesh, best.mesh) if a > b) if any(
            a > b for a, b in zip(c.mesh, best.mesh)) else None
        return " ".join(changed) + (f": {axis} {what[axis]}" if axis else "")
    if c.shard_params != best.shard_params:
        return "zero1 all-gathers the updated parameters" if not c.shard_params else \
            "fsdp gathers each layer's weights"
    if c.attention != best.attention:
        return f"{c.attention} attention"
    if c.scan_layers != best.scan_layers:
        return "scanned layers" if c.scan_layers else "unrolled layers (slower to compile)"
    return ""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
