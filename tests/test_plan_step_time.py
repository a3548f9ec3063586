"""The planner's hardware tables (jaxmt/plan/targets.py) and analytic step time
(jaxmt/plan/step_time.py): target parsing, the flops model against XLA's own count,
and how collectives and the bound move with the mesh."""

import dataclasses

import jax
import pytest

from jaxmt.config import ModelConfig, TrainConfig
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.plan.step_time import param_count, predict_step_time, step_flops
from jaxmt.plan.targets import device_chip, parse_target
from jaxmt.plan.workload import Candidate, Workload


# ---------------------------------------------------------------------------- targets


@pytest.mark.parametrize("text, kind, devices, hosts, topology, domains", [
    ("cpu:8", "cpu", 8, 1, None, 1),
    ("tpu-v5e:4x4", "tpu", 16, 4, "v5e:4x4", 1),
    ("tpu-v5e:16x16", "tpu", 256, 64, "v5e:16x16", 1),
    ("tpu-v5e:16x16*2", "tpu", 512, 128, "v5e:16x16", 2),
    ("tpu-v5p:2x2x2", "tpu", 8, 2, "v5p:2x2x2", 1),
    ("tpu-v4:2x2x4", "tpu", 16, 4, "v4:2x2x4", 1),
    ("tpu-v6e:4x4", "tpu", 16, 4, "v6e:4x4", 1),
    ("h100:8", "gpu", 8, 1, None, 1),
    ("h100:8x4", "gpu", 32, 4, None, 4),
    ("h200:4", "gpu", 4, 1, None, 1),
    ("a100:8x2", "gpu", 16, 2, None, 2),
])
def test_parse_target_forms(text, kind, devices, hosts, topology, domains):
    t = parse_target(text)
    assert (t.text, t.kind, t.num_devices, t.num_hosts, t.topology, t.num_domains) == (
        text, kind, devices, hosts, topology, domains)
    assert t.chip.peak("bfloat16") > 0 and t.chip.hbm_bytes > 0 and t.chip.source
    assert t.source and t.intra_bandwidth > 0 and t.inter_bandwidth > 0
    if kind != "cpu":  # the fast links are faster than the network between hosts/slices
        assert t.intra_bandwidth > t.inter_bandwidth


def test_target_figures_and_topology_arguments():
    v5e, v4 = parse_target("tpu-v5e:4x4"), parse_target("tpu-v4:2x2x4")
    assert v5e.chip.peak("bfloat16") == 197e12 and v5e.chip.hbm_bytes == 16 * 2**30
    assert v5e.intra_bandwidth == 100e9  # 400 GB/s bidirectional over 4 ports
    assert v4.topology_kwargs() == {"topology_name": "v4:2x2x4", "platform": "tpu",
                                    "chip_config_name": "megacore"}
    assert parse_target("tpu-v5e:4x4*2").topology_kwargs()["num_slices"] == 2
    h100 = parse_target("h100:8")
    assert h100.chip.peak("bfloat16") == 989.4e12 and h100.intra_bandwidth == 450e9
    cpu = parse_target("cpu:8")
    assert "estimated" in cpu.chip.name and "estimated" in cpu.chip.source
    # Eight fake devices share the host: each gets an eighth.
    assert cpu.chip.peak("float32") == pytest.approx(parse_target("cpu:1").chip.peak("float32") / 8)


@pytest.mark.parametrize("text, fragment", [
    ("gpu:8", "unknown family"), ("h100:16", "at most 8"), ("tpu-v5e:2x2x2", "AxB"),
    ("tpu-v5p:4x4", "AxBxC"), ("cpu:0", "positive"), ("cpu", "FAMILY:SIZES"),
    ("tpu-v7:4x4", "unknown TPU"), ("tpu-v5e:32x32", "at most 256"),
    ("tpu-v5e:4x4*0", "slice count"), ("cpu:2x2", "one device count"), ("h100:8x2x2", "NxM"),
])
def test_parse_target_errors_name_the_text_and_the_forms(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_target(text)
    msg = str(e.value)
    assert repr(text) in msg and fragment in msg and "tpu-v5p:AxBxC" in msg


def test_device_chip():
    cpu = device_chip(jax.devices()[0])
    assert "estimated" in cpu.name  # 8 fake devices: an eighth of the host each
    assert cpu.peak("float32") == pytest.approx(parse_target("cpu:8").chip.peak("float32"))

    class Fake:
        def __init__(self, platform, kind):
            self.platform, self.device_kind = platform, kind
    assert device_chip(Fake("tpu", "TPU v5 lite")).name == "TPU v5e"
    assert device_chip(Fake("tpu", "TPU v4")).name == "TPU v4"
    assert device_chip(Fake("gpu", "NVIDIA H100 80GB HBM3")).name == "H100 SXM"
    assert device_chip(Fake("gpu", "NVIDIA H100 PCIe")).name == "H100 PCIe"
    for bad in (Fake("gpu", "NVIDIA GeForce GTX 1080"), Fake("tpu", "TPU v9")):
        with pytest.raises(ValueError, match="unknown"):
            device_chip(bad)


# ---------------------------------------------------------------------------- flops

TINY = ModelConfig(vocab_size=1024, emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256,
                   num_encoder_layers=1, num_decoder_layers=1, precision="fp32")


def _xla_flops(cfg: ModelConfig, batch: int, src: int, tgt: int) -> float:
    """XLA's flop count of value_and_grad of the training loss (as
    benchmarks/remat_memory.py compiles it), on this CPU."""
    model = EncoderDecoderModel(cfg)
    data = jax.eval_shape(lambda: model.dummy_batch(batch, src, tgt))
    grad = jax.value_and_grad(lambda p, b: model.loss(p, b, dropout_rng=None)[0])
    cost = jax.jit(grad).lower(model.param_shapes(), data).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.slow  # one CPU compile each, ~6 s on 2 shared cores
@pytest.mark.parametrize("remat", ["none", "full"])
def test_step_flops_match_xla(remat):
    """The analytic matmul flops agree with XLA's count (which also counts the
    elementwise work) within 10%; measured ratios ~1.01 (none) and ~0.99 (full)."""
    cfg = dataclasses.replace(TINY, encoder_remat=remat, decoder_remat=remat)
    ratio = _xla_flops(cfg, 4, 64, 48) / step_flops(cfg, 4, 64, 48, "cpu")
    assert 0.9 < ratio < 1.1, ratio


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "save_attention_out", "dots_saveable"])
def test_step_flops_remat_policies_match_xla_scanned(remat):
    """Remat's recompute per policy, counted by XLA under ``scan_layers`` (whose layer
    body XLA counts once: so against the analytic count of a one-layer model)."""
    cfg = dataclasses.replace(TINY, num_encoder_layers=2, num_decoder_layers=2,
                              scan_layers=True, encoder_remat=remat, decoder_remat=remat)
    one = dataclasses.replace(cfg, num_encoder_layers=1, num_decoder_layers=1)
    ratio = _xla_flops(cfg, 4, 64, 48) / step_flops(one, 4, 64, 48, "cpu")
    assert 0.9 < ratio < 1.1, ratio


def test_param_count_matches_the_model():
    for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=True, mlp_activations=("relu",),
                                          use_bias=True, norm_type="layer",
                                          final_logits_bias=True)):
        shapes = EncoderDecoderModel(cfg).param_shapes()
        assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(shapes))


def test_remat_and_attention_flops_order():
    f = lambda **kw: step_flops(dataclasses.replace(TINY, **kw), 8, 512, 512, "tpu")  # noqa: E731
    none = f()
    assert f(encoder_remat="dots_saveable", decoder_remat="dots_saveable") == none
    assert none < f(encoder_remat="save_attention_out", decoder_remat="save_attention_out") \
        < f(encoder_remat="full", decoder_remat="full")
    # The flash kernel's backward recomputes scores: more flops than xla's.
    flash = dataclasses.replace(TINY.attention, encoder="flash", decoder="flash")
    assert f(attention=flash) > none


# ---------------------------------------------------------------------------- step time

BASE = ModelConfig(vocab_size=32128, emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
                   num_encoder_layers=12, num_decoder_layers=12, precision="bf16")
W = Workload(BASE, TrainConfig(batch_size=256), 512, 512)


def test_tensor_parallel_splits_compute_and_adds_all_reduces():
    target = parse_target("tpu-v5e:4x4")
    dp = predict_step_time(W, Candidate(mesh=(1, 16, 1, 1)), target)
    # Same devices, split by tensor: per-device compute is the same, the per-device
    # batch 4x larger but matmuls 4x narrower; Megatron's activation all-reduces appear.
    tp = predict_step_time(W, Candidate(mesh=(1, 4, 1, 4)), target)
    assert tp.flops == dp.flops and tp.flops_per_device == dp.flops_per_device
    assert "tensor" not in dp.collectives and tp.collectives["tensor"]["bytes"] > 0
    # Doubling tensor at a fixed data size halves the flops per device and adds bytes.
    small = Workload(BASE, TrainConfig(batch_size=64), 512, 512)
    a = predict_step_time(small, Candidate(mesh=(1, 4, 1, 2)), parse_target("tpu-v5e:2x4"))
    b = predict_step_time(small, Candidate(mesh=(1, 4, 1, 4)), target)
    assert b.flops_per_device == pytest.approx(a.flops_per_device / 2)
    assert b.collectives["tensor"]["bytes"] > a.collectives["tensor"]["bytes"]


def test_collective_bytes_scale_with_the_mesh():
    target = parse_target("tpu-v5e:4x4")
    n_bytes = param_count(BASE) * 4  # float32 gradients
    dp = predict_step_time(W, Candidate(mesh=(1, 16, 1, 1)), target)
    assert dp.collectives["data"]["bytes"] == pytest.approx(2 * 15 / 16 * n_bytes)
    fsdp = predict_step_time(W, Candidate(mesh=(1, 1, 16, 1)), target)
    # ZeRO-3: gather forward and backward, reduce-scatter: 3 x (g-1)/g of the parameters.
    assert fsdp.collectives["fsdp"]["bytes"] == pytest.approx(3 * 15 / 16 * n_bytes)
    zero1 = predict_step_time(W, Candidate(mesh=(1, 1, 16, 1), shard_params=False), target)
    assert zero1.collectives["fsdp"]["bytes"] == pytest.approx(2 * 15 / 16 * n_bytes)
    # Microbatches repeat the fsdp gathers, not the data-parallel all-reduce.
    mb = predict_step_time(W, Candidate(mesh=(1, 2, 8, 1), num_microbatches=4), target)
    one = predict_step_time(W, Candidate(mesh=(1, 2, 8, 1)), target)
    assert mb.collectives["fsdp"]["bytes"] == pytest.approx(4 * one.collectives["fsdp"]["bytes"])
    assert mb.collectives["data"]["bytes"] == one.collectives["data"]["bytes"]


def test_axes_across_hosts_use_the_slow_links():
    target = parse_target("h100:8x4")
    hier = predict_step_time(W, Candidate(mesh=(4, 8, 1, 1)), target)
    flat = predict_step_time(W, Candidate(mesh=(1, 32, 1, 1)), target)
    assert hier.collectives["replica"]["link"] == "inter"
    assert hier.collectives["data"]["link"] == "intra"
    assert flat.collectives["data"]["link"] == "inter"
    assert flat.collectives["data"]["seconds"] > hier.collectives["data"]["seconds"]


def test_bound_classification():
    # Plenty of rows per device on a TPU: the matmuls decide.
    assert predict_step_time(W, Candidate(mesh=(1, 8, 1, 1), attention="flash"),
                             parse_target("tpu-v5p:2x2x2")).bound == "compute"
    # One row per device, a large vocabulary: weight and optimizer traffic decide.
    tiny_batch = Workload(BASE, TrainConfig(batch_size=8, optimizer="adamw"), 16, 16)
    assert predict_step_time(tiny_batch, Candidate(mesh=(1, 8, 1, 1)),
                             parse_target("h100:8")).bound == "memory"
    # Data parallelism over hosts joined by InfiniBand with a small per-device batch:
    # the gradient all-reduce cannot hide.
    small = Workload(BASE, TrainConfig(batch_size=32), 64, 64)
    s = predict_step_time(small, Candidate(mesh=(1, 32, 1, 1)), parse_target("h100:8x4"))
    assert s.bound == "collective" and s.exposed_collective_s > 0
    # The step is its parts: nothing counted twice, nothing lost.
    assert s.total_s == pytest.approx(
        sum(max(c, m) for c, m in s.parts.values()) + s.exposed_collective_s)


def test_mismatched_mesh_or_batch_is_an_error():
    with pytest.raises(ValueError, match="devices"):
        predict_step_time(W, Candidate(mesh=(1, 8, 1, 1)), parse_target("tpu-v5e:4x4"))
    with pytest.raises(ValueError, match="does not split"):
        predict_step_time(dataclasses.replace(W, train=TrainConfig(batch_size=24)),
                          Candidate(mesh=(1, 16, 1, 1)), parse_target("tpu-v5e:4x4"))
