"""Analytic training-step time: flops, memory traffic and collectives, with zero compiles.

The model follows jaxmt's network exactly (``jaxmt/modeling``): T5.1.1-style layers,
``mlp_activations`` input projections per MLP (2 = gated), cross-attention, an untied or
tied output layer, and the remat policies of :func:`jaxmt.modeling.network.remat_policy`.

**Flops** (:func:`flops_breakdown`, :func:`step_flops`): matmul flops only (2 per
multiply-add). The backward pass costs twice the forward (one product for the input
gradient, one for the weight gradient), so a step is 3x the forward, plus what remat
recomputes:

* ``full`` saves only each layer's input: the backward recomputes the layer's forward,
  except its last matmul (MLP ``wo``), whose output nothing needs (XLA drops it).
* ``save_attention_out`` saves each attention block's output: it recomputes everything
  but the attention output projections and MLP ``wo``.
* ``dots_saveable`` and ``offload`` keep every ``mixed_einsum`` output (named ``dot``):
  no matmul is recomputed on the xla path; the flash/blockwise kernels' outputs are not
  ``dot`` outputs, so their forward is recomputed.

Attention's score and value products (one *unit* = ``2 b h q k d``) cost 2 units
forward; the backward 4 (xla, dot_product), 5 (blockwise: it recomputes the scores)
or 7 (the Pallas flash kernel: its dq and dkv kernels each recompute scores and
probabilities). Flash skips tiles above the diagonal in causal attention.

**Time**: each category of work (projections, attention, elementwise, weights and the
optimizer) takes ``max(flops / (peak * efficiency), bytes / hbm_bandwidth)`` (a
roofline per category), and collectives add what does not overlap (see
:data:`OVERLAP`). Efficiencies are explicit constants (:data:`MATMUL_EFFICIENCY`,
:data:`ATTENTION_EFFICIENCY`), not fitted.

**Collectives**, per mesh axis, per device (ring algorithms: an all-gather or
reduce-scatter of ``V`` bytes over ``g`` devices sends ``(g - 1) / g * V``, an
all-reduce twice that):

* ``replica``/``data``: one all-reduce of the gradients (sharded over fsdp and tensor)
  per step; with microbatches the trainer sums locally and reduces once.
* ``fsdp`` (ZeRO-3): per microbatch, the parameters all-gathered for the forward and
  again for the backward, and the gradients reduce-scattered. ZeRO-1
  (``shard_params=False``): gradients reduce-scattered per microbatch, the updated
  parameters all-gathered once.
* ``tensor`` (Megatron): one all-reduce of ``[batch, len, embed]`` per block forward
  (attention, cross-attention, MLP) and one per block backward (more for the
  cross-attention keys/values and remat recompute), the embedding lookups over the
  vocabulary-sharded table, and the logits' input gradient. The partial sums are the
  matmuls' float32 outputs, so they move as float32.

Not modelled: ``offload``'s host transfers (its matmul outputs go to host memory and
back over PCIe), dropout, approximate attention (local, bigbird, performer: a
ValueError), adapters and LoRA, and padding of axes that do not divide evenly.

Bandwidths come from :mod:`jaxmt.plan.targets` (cited there): an axis whose devices sit
in one slice/host uses ``intra_bandwidth`` (ICI, NVLink), one that spans them
``inter_bandwidth`` (DCN, InfiniBand). The mesh is laid out ``(replica, data, fsdp,
tensor)``, tensor innermost, as :class:`jaxmt.sharding.partitioning.Partitioner` does.
"""

from __future__ import annotations

import dataclasses
import math

from jaxmt import hardware
from jaxmt.config import PRECISIONS, ModelConfig
from jaxmt.modeling.attention import runs_as
from jaxmt.plan.targets import Target
from jaxmt.plan.workload import Candidate, Workload

# Fraction of peak the dense projections reach in a training step. Assumed, not fitted:
# MaxText reports 55-65% MFU for dense transformers on TPU v5e/v5p with large matmuls
# (its README's performance tables); JAX/XLA on H100 typically reaches 40-50% (NVIDIA
# JAX-Toolbox / MaxText GPU results); a T5-base's matmuls (d_model 768) are smaller, so
# the lower ends. CPU: measured here on the 2-core EPYC (docs/stack-notes.md: ~144
# GFLOP/s fp32 and ~230 bf16 over whole demo steps against ~166 and ~332 estimated peak).
MATMUL_EFFICIENCY = {"tpu": 0.55, "gpu": 0.45, "cpu": 0.7}
# Fraction of peak for attention's score/value products, by implementation. The xla
# path's memory traffic (scores and probabilities through HBM) is counted separately,
# so 0.5 is its matmuls' own rate on [q, k] tiles of head_dim 64. FlashAttention-2 (Dao
# 2023, arXiv:2307.08691) reports 50-73% of peak forward and ~35-63% forward+backward on
# A100/H100; the Pallas kernel with T5's bias lookups per tile is taken at 0.45; the
# pure-JAX blockwise loop (a lax.scan of small dots) at 0.3.
ATTENTION_EFFICIENCY = {"xla": 0.5, "dot_product": 0.5, "flash": 0.45, "blockwise": 0.3}
# Share of the busy (compute/memory) time under which data-parallel and fsdp collectives
# hide: XLA runs them asynchronously (TPU/GPU latency-hiding scheduler), gathering the
# next layer's weights and reducing the previous layer's gradients during compute, but
# the first gather and the last reduction are exposed. Tensor all-reduces sit between
# dependent matmuls and count in full. CPU collectives are synchronous: nothing hides.
OVERLAP = {"tpu": 0.8, "gpu": 0.8, "cpu": 0.0}
# Flash kernel tile length (jaxmt.config.AttentionConfig.block_size = 0 defaults).
FLASH_BLOCK = {"tpu": 512, "gpu": 64, "cpu": 512}
# HBM passes over each parameter in the optimizer update (read p, g, moments; write p,
# moments): AdamW 7; Adafactor's factored second moment is rows + columns, ~0.
OPTIMIZER_PASSES = {"adamw": 7, "adafactor": 4}

MESH_AXES = ("replica", "data", "fsdp", "tensor")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A predicted training step on one target.

    Attributes:
      flops: matmul flops of the whole step, all devices (forward, backward, remat).
      flops_per_device: ``flops`` over the devices.
      compute_s: time of the flops at ``peak * efficiency``.
      memory_s: time of the HBM traffic at ``hbm_bandwidth``.
      collective_s: all collectives, overlapped or not.
      exposed_collective_s: the part of ``collective_s`` that adds to the step.
      collectives: per mesh axis of size > 1: ``bytes`` sent per device, ``seconds``,
        ``bandwidth`` (bytes/s) and ``link`` ("intra" or "inter").
      total_s: the step: per-category ``max(compute, memory)`` plus exposed collectives.
      bound: "compute" | "memory" | "collective": what the largest share of
        ``total_s`` waits on.
      efficiency: flops per device / (peak * compute_s): the blended efficiency assumed.
      bytes_per_device: HBM traffic per device.
      parts: per category (``projections``, ``attention``, ``elementwise``,
        ``weights``): ``(compute_s, memory_s)``.
      dtype: the compute dtype the peak was taken for.
    """

    flops: float
    flops_per_device: float
    compute_s: float
    memory_s: float
    collective_s: float
    exposed_collective_s: float
    collectives: dict[str, dict]
    total_s: float
    bound: str
    efficiency: float
    bytes_per_device: float
    parts: dict[str, tuple[float, float]]
    dtype: str

    def tokens_per_s(self, tokens: int) -> float:
        return tokens / self.total_s


# ---------------------------------------------------------------------------- flops


def _impl(cfg: ModelConfig, kind: str, key_len: int, platform: str | None) -> str:
    impl = cfg.attention.resolve(kind, key_len)
    if platform is not None:  # what jaxmt.modeling.attention.attend runs there
        impl = runs_as(impl, cfg.attention, platform)
    if impl not in ATTENTION_EFFICIENCY:
        raise ValueError(f"the step-time model covers exact attention only "
                         f"({sorted(ATTENTION_EFFICIENCY)}), not {impl!r}")
    return impl


def _attn_units(impl: str, remat: str) -> float:
    """Score/value product units (2 b h q k d each) per step: forward, backward, remat."""
    bwd = {"xla": 4, "dot_product": 4, "blockwise": 5, "flash": 7}[impl]
    kernel = impl in ("flash", "blockwise")
    recompute = {"none": 0, "full": 2, "save_attention_out": 2,
                 "dots_saveable": 2 if kernel else 0, "offload": 2 if kernel else 0}[remat]
    return 2 + bwd + recompute


def _causal_share(impl: str, length: int, platform: str | None) -> float:
    """Share of score tiles a causal attention computes: the flash kernel skips tiles
    wholly above the diagonal; the others compute all."""
    if impl != "flash":
        return 1.0
    n = max(1, math.ceil(length / FLASH_BLOCK.get(platform or "tpu", 512)))
    return (n + 1) / (2 * n)


def flops_breakdown(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int,
                    platform: str | None = None) -> dict[str, float]:
    """Training-step matmul flops by part (forward + backward + remat recompute).

    Args:
      cfg: the model (its remat policies and attention implementations apply).
      batch, src_len, tgt_len: rows and tokens per row of the global batch.
      platform: "tpu" | "gpu" | "cpu" where it matters (flash runs as blockwise on CPU;
        its tile size); None: the Pallas kernel with TPU tiles.

    Returns:
      ``encoder_projections``, ``decoder_projections``, ``logits``,
      ``encoder_attention``, ``decoder_attention``, ``cross_attention``.
    """
    e, hd, h, d, m = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.num_heads, cfg.head_dim, \
        cfg.mlp_dim
    na = len(cfg.mlp_activations)
    ns, nt = batch * src_len, batch * tgt_len  # tokens
    le, ld = cfg.num_encoder_layers, cfg.num_decoder_layers

    def remat_share(policy: str, total: float, out_proj: float, wo: float) -> float:
        """Forward matmul flops the policy recomputes, of a layer's projections."""
        if policy == "full":
            return total - wo
        if policy == "save_attention_out":
            return total - out_proj - wo
        return 0.0

    # Encoder layer: q, k, v, out; MLP inputs and output (forward, per layer).
    enc_attn_out = 2 * ns * hd * e
    enc_wo = 2 * ns * m * e
    enc = 3 * 2 * ns * e * hd + enc_attn_out + na * 2 * ns * e * m + enc_wo
    enc_total = le * (3 * enc + remat_share(cfg.encoder_remat, enc, enc_attn_out, enc_wo))
    # Decoder layer: self q, k, v, out; cross q, out on the target, k, v on the source; MLP.
    dec_outs = 2 * (2 * nt * hd * e)
    dec_wo = 2 * nt * m * e
    dec = (3 * 2 * nt * e * hd + 2 * nt * hd * e + 2 * nt * e * hd + 2 * nt * hd * e
           + 2 * 2 * ns * e * hd + na * 2 * nt * e * m + dec_wo)
    dec_total = ld * (3 * dec + remat_share(cfg.decoder_remat, dec, dec_outs, dec_wo))

    unit = lambda q, k: 2 * batch * h * q * k * d  # noqa: E731
    ie = _impl(cfg, "encoder", src_len, platform)
    idd = _impl(cfg, "decoder", tgt_len, platform)
    ic = _impl(cfg, "cross", src_len, platform)
    return {
        "encoder_projections": enc_total,
        "decoder_projections": dec_total,
        "logits": 3 * 2 * nt * e * cfg.vocab_size,
        "encoder_attention": le * unit(src_len, src_len) * _attn_units(ie, cfg.encoder_remat),
        "decoder_attention": ld * unit(tgt_len, tgt_len) * _attn_units(idd, cfg.decoder_remat)
        * _causal_share(idd, tgt_len, platform),
        "cross_attention": ld * unit(tgt_len, src_len) * _attn_units(ic, cfg.decoder_remat),
    }


def step_flops(model_cfg: ModelConfig, batch: int, src_len: int, tgt_len: int,
               platform: str | None = None) -> float:
    """Analytic matmul flops of one training step (forward, backward, remat), all
    devices: the sum of :func:`flops_breakdown`."""
    return float(sum(flops_breakdown(model_cfg, batch, src_len, tgt_len, platform).values()))


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the model (adapters and LoRA not counted)."""
    e, hd, m, na = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, len(cfg.mlp_activations)
    norms = 2 if cfg.norm_type == "layer" else 1  # scale (+ bias)
    bias = cfg.use_bias
    attn = 4 * e * hd + (3 * hd + e if bias else 0)
    mlp = na * e * m + m * e + (na * m + e if bias else 0)
    enc = attn + mlp + 2 * norms * e
    dec = 2 * attn + mlp + 3 * norms * e
    n = cfg.vocab_size * e + cfg.num_encoder_layers * enc + cfg.num_decoder_layers * dec
    if not cfg.tie_embeddings:
        n += e * cfg.vocab_size
    if cfg.final_logits_bias:
        n += cfg.vocab_size
    if cfg.norm_position == "pre":
        n += 2 * norms * e
    if cfg.position_embedding == "relative":
        n += 2 * cfg.relpos_buckets * cfg.num_heads
    return n


# ---------------------------------------------------------------------------- time


def _precision(cfg: ModelConfig, target: Target) -> str:
    """The concrete precision policy: the config's, or for "auto" the target's rule
    (jaxmt.hardware) applied to the target rather than to this machine."""
    if cfg.precision != "auto":
        return cfg.precision
    if target.kind == "cpu":
        return hardware.choose_precision("cpu", cpu_flags=hardware.read_cpu_flags()).policy
    return "bf16"  # every TPU, and the GPUs in the table (compute capability >= 8.0)


def _ring(kind: str, nbytes: float, g: int) -> float:
    """Bytes one device sends in a ring collective over ``g`` devices; ``nbytes`` is
    the full (gathered / reduced) size per device."""
    if g <= 1:
        return 0.0
    share = (g - 1) / g * nbytes
    return 2 * share if kind == "all_reduce" else share


def _axis_links(sizes: dict[str, int], target: Target) -> dict[str, tuple[str, float]]:
    """Per mesh axis: ("intra" | "inter", bytes/s). Devices fill the mesh tensor-first,
    so an axis stays inside a slice/host while it and the axes inside it fit one."""
    out, inner = {}, 1
    for a in reversed(MESH_AXES):
        inner *= sizes[a]
        if inner <= target.devices_per_domain:
            out[a] = ("intra", target.intra_bandwidth)
        else:
            out[a] = ("inter", target.inter_bandwidth)
    return out


def predict_step_time(w: Workload, c: Candidate, target: Target) -> StepTime:
    """The analytic step time of workload ``w`` under candidate ``c`` on ``target``.

    Raises:
      ValueError: the mesh does not use the target's devices, the batch does not split
        over it, or an approximate attention is asked for.
    """
    sizes = c.sizes
    n_dev = math.prod(c.mesh)
    if n_dev != target.num_devices:
        raise ValueError(f"mesh {c.mesh} has {n_dev} devices, target {target.text!r} has "
                         f"{target.num_devices}")
    w = c.apply(w)
    cfg, nmb = w.model, w.train.num_microbatches
    dp = sizes["replica"] * sizes["data"] * sizes["fsdp"]
    if w.batch % (dp * nmb):
        raise ValueError(f"batch {w.batch} does not split over replica x data x fsdp x "
                         f"microbatches = {dp * nmb}")
    t = sizes["tensor"]
    policy = _precision(cfg, target)
    dtype, pdtype = PRECISIONS[policy]
    cb, pb = _BYTES[dtype], _BYTES[pdtype]
    chip, kind = target.chip, target.kind
    peak = chip.peak(dtype)

    parts = flops_breakdown(cfg, w.batch, w.src_len, w.tgt_len, kind)
    flops = float(sum(parts.values()))
    attn_flops = {k: v / n_dev for k, v in parts.items() if k.endswith("attention")}
    proj_flops = (parts["encoder_projections"] + parts["decoder_projections"]
                  + parts["logits"]) / n_dev

    # ---- compute
    eff = MATMUL_EFFICIENCY[kind]
    impls = {"encoder_attention": _impl(cfg, "encoder", w.src_len, kind),
             "decoder_attention": _impl(cfg, "decoder", w.tgt_len, kind),
             "cross_attention": _impl(cfg, "cross", w.src_len, kind)}
    attn_eff = {k: min(eff, ATTENTION_EFFICIENCY[impls[k]]) for k in impls}
    proj_c = proj_flops / (peak * eff)
    attn_c = sum(attn_flops[k] / (peak * attn_eff[k]) for k in impls)

    # ---- memory traffic per device
    e, m, hd, v = cfg.emb_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim, cfg.vocab_size
    na = len(cfg.mlp_activations)
    b_dev = w.batch / dp  # rows per device per step (all microbatches)
    ns, nt = b_dev * w.src_len, b_dev * w.tgt_len
    le, ld = cfg.num_encoder_layers, cfg.num_decoder_layers
    rec = {"none": 0, "full": 1, "save_attention_out": 1, "dots_saveable": 0, "offload": 0}
    # Projections: each matmul reads its input and writes its output (compute dtype),
    # forward once, backward about twice (input gradient written, output gradient read).
    # Tensor parallelism splits the head and MLP widths; the embed-wide inputs and the
    # row-parallel outputs' partial sums stay whole on every device.
    hd_t, m_t = hd / t, m / t
    enc_io = (4 * (e + hd_t) + na * (e + m_t) + (m_t + e)) * ns
    dec_io = (6 * (e + hd_t) + na * (e + m_t) + (m_t + e)) * nt + 2 * (e + hd_t) * ns
    proj_m = cb * (enc_io * le * (3 + rec[cfg.encoder_remat])
                   + dec_io * ld * (3 + rec[cfg.decoder_remat]))
    # Logits [b, t, v / tensor]: float32 out, read by the loss, gradient written and read.
    proj_m += (4 + 4 + cb + 2 * cb) * nt * v / t + 3 * cb * nt * e
    # Attention: the xla/dot_product path writes float32 scores, reads them for the
    # softmax, writes and reads probabilities; the backward about twice that.
    heads = cfg.num_heads / t

    def scores(impl, q, k, rows, policy_):
        # Fused kernels keep the scores on chip: flash, blockwise, and cuDNN's (what
        # dot_product runs on CUDA GPUs in half precision).
        if impl in ("flash", "blockwise") or (impl == "dot_product" and kind == "gpu" and cb == 2):
            return 0.0
        return rows * heads * q * k * (8 + 2 * cb) * (3 + rec[policy_])

    attn_m = (le * scores(impls["encoder_attention"], w.src_len, w.src_len, b_dev,
                          cfg.encoder_remat)
              + ld * scores(impls["decoder_attention"], w.tgt_len, w.tgt_len, b_dev,
                            cfg.decoder_remat)
              + ld * scores(impls["cross_attention"], w.tgt_len, w.src_len, b_dev,
                            cfg.decoder_remat))
    # Elementwise work XLA does not fuse into the matmuls: the residual stream read and
    # written around each block, and the MLP's activations (one MLP-wide tensor per
    # input projection), per layer token, forward and backward (an estimate).
    elem_m = cb * 3 * ((4 * e + na * m_t) * (ns * le + nt * ld) + 2 * e * nt * ld)
    # Weights: read forward and backward (in their dtype), gradient written, per
    # microbatch, plus remat re-reads; with microbatches float32 sums read and written;
    # then the optimizer over this device's shard.
    n_params = param_count(cfg)
    full_w = n_params / t  # the gathered working copy
    shard = n_params / (t * sizes["fsdp"])
    rematted = (le * rec[cfg.encoder_remat] + ld * rec[cfg.decoder_remat]) / max(1, le + ld)
    weights_m = nmb * full_w * pb * (3 + rematted)
    if nmb > 1:
        weights_m += nmb * 2 * 4 * (shard if sizes["fsdp"] > 1 else full_w)
    weights_m += OPTIMIZER_PASSES.get(w.train.optimizer, 7) * 4 * shard

    bw = chip.hbm_bandwidth
    cat = {"projections": (proj_c, proj_m / bw), "attention": (attn_c, attn_m / bw),
           "elementwise": (0.0, elem_m / bw), "weights": (0.0, weights_m / bw)}
    compute_s = sum(x for x, _ in cat.values())
    memory_s = sum(y for _, y in cat.values())
    busy_compute = sum(x for x, y in cat.values() if x >= y)
    busy_memory = sum(y for x, y in cat.values() if y > x)
    busy = busy_compute + busy_memory

    # ---- collectives
    links = _axis_links(sizes, target)
    grad_shard = n_params * pb / (t * sizes["fsdp"])
    sent: dict[str, float] = {}
    # Data-parallel axes: one all-reduce of this device's gradient shard per step.
    for a in ("replica", "data"):
        sent[a] = _ring("all_reduce", grad_shard, sizes[a])
    f = sizes["fsdp"]
    gathered = n_params * pb / t
    if c.shard_params:
        sent["fsdp"] = nmb * (2 * _ring("all_gather", gathered, f)
                              + _ring("reduce_scatter", gathered, f))
    else:
        sent["fsdp"] = (nmb * _ring("reduce_scatter", gathered, f)
                        + _ring("all_gather", gathered, f))
    # Tensor: all-reduces of [rows, len, embed] float32 partial sums.
    extra = {"full": 1, "none": 0, "save_attention_out": 0, "dots_saveable": 0, "offload": 0}
    enc_ar = le * (4 + extra[cfg.encoder_remat]) * ns
    dec_ar = ld * (6 + 2 * extra[cfg.decoder_remat]) * nt + ld * ns
    act_ar = 4 * e * (enc_ar + dec_ar + nt) + pb * e * (ns + nt)  # + logits grad, lookups
    sent["tensor"] = _ring("all_reduce", act_ar, t)

    collectives = {}
    hidden_pool = OVERLAP[kind] * busy
    collective_s = exposed = 0.0
    for a in MESH_AXES:
        if sizes[a] <= 1:
            continue
        link, band = links[a]
        secs = sent[a] / band
        collectives[a] = {"bytes": sent[a], "seconds": secs, "bandwidth": band, "link": link}
        collective_s += secs
        if a == "tensor":
            exposed += secs
        else:
            hidden = min(secs, hidden_pool)
            hidden_pool -= hidden
            exposed += secs - hidden

    total = busy + exposed
    bound = max((("compute", busy_compute), ("memory", busy_memory), ("collective", exposed)),
                key=lambda kv: kv[1])[0]
    return StepTime(flops=flops, flops_per_device=flops / n_dev, compute_s=compute_s,
                    memory_s=memory_s, collective_s=collective_s, exposed_collective_s=exposed,
                    collectives=collectives, total_s=total, bound=bound,
                    efficiency=(flops / n_dev) / (peak * compute_s) if compute_s else 0.0,
                    bytes_per_device=proj_m + attn_m + elem_m + weights_m, parts=cat,
                    dtype=dtype)
