"""`jaxmt profile`: the step-time breakdown, MFU, top ops and bottleneck of a trained run.

The trace arithmetic and the bottleneck rules run on small hand-made inputs; the scan
correction against XLA's own cost analysis of an unrolled program; the command itself
on a model trained here for two steps (8 fake devices, scanned layers, 2 microbatches),
whose checkpoints it must leave untouched.
"""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxmt import config as cfglib
from jaxmt.plan import profile as prof

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- flops of scans

def test_scan_correction_adds_what_cost_analysis_counts_once():
    def loss(ws, x):
        body = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731
        return jax.lax.scan(body, x, ws)[0].sum()

    def unrolled(ws, x):
        for i in range(ws.shape[0]):
            x = jnp.tanh(x @ ws[i])
        return x.sum()

    args = jnp.ones((4, 128, 128)), jnp.ones((64, 128))
    # Gradients for both arguments: else XLA drops the first layer's input gradient from
    # the unrolled program, which a scan (one body for every layer) cannot.
    scanned = jax.value_and_grad(loss, argnums=(0, 1))
    plain = jax.value_and_grad(unrolled, argnums=(0, 1))
    cost = lambda f: jax.jit(f).lower(*args).compile().cost_analysis()["flops"]  # noqa: E731
    traced = jax.jit(scanned).trace(*args)
    forward = 4 * 2 * 64 * 128 * 128  # [64, 128] x [128, 128], 4 layers
    # Forward once, backward twice (input and weight gradients): 3 x forward, each scanned.
    assert prof.matmul_flops(traced.jaxpr) == 3 * forward
    assert prof.matmul_flops(traced.jaxpr, scan_once=True) == 3 * forward / 4
    assert prof.scan_correction(jax.jit(plain).trace(*args).jaxpr) == 0
    assert cost(scanned) < 0.5 * cost(plain)  # why the correction exists
    assert cost(scanned) + prof.scan_correction(traced.jaxpr) == pytest.approx(cost(plain),
                                                                                rel=0.03)


# ---------------------------------------------------------------- the trace

def _x(name, ts, dur, tid=1, op=False, **args):
    """A complete event; ``op``: an XLA op's, as XLA's CPU runtime records them."""
    if op:
        args = dict(args, hlo_op=name, hlo_module="jit__train_step")
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def test_breakdown_partitions_the_wall_time_and_ranks_exclusive_op_time(tmp_path):
    op = dict(op=True)
    events = [
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name",
         "args": {"name": "tf_XLAPjRtCpuClient/1"}},
        {"ph": "M", "pid": 1, "tid": 3, "name": "thread_name",
         "args": {"name": "tf_XLAPjRtCpuClient/2"}},
        # Step 1: 100 us; input 20; ops on two device threads, a while loop with a body.
        _x(prof.STEP_SPAN, 0, 100), _x(prof.INPUT_SPAN, 0, 20),
        _x("while.1", 30, 40, tid=2, **op), _x("fusion.1", 35, 10, tid=2, **op),
        _x("end: while.1", 70, 0.1, tid=2), _x("all-reduce.2", 50, 38, tid=3, **op),
        # Step 2: 50 us; input 10; one op. An op outside the steps (warm-up) is ignored.
        _x(prof.STEP_SPAN, 200, 50), _x(prof.INPUT_SPAN, 200, 10),
        _x("fusion.1", 220, 25, tid=2, **op), _x("fusion.9", 500, 99, tid=2, **op),
        _x("ThreadpoolListener::Record", 40, 1e-6, tid=2),
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    parts = prof.breakdown(prof.read_events(str(path)), steps=2,
                           sources={"fusion.1": "jit(train)/encoder/mlp/dot_general"})
    assert parts["wall"] == pytest.approx(150e-6) and parts["input"] == pytest.approx(30e-6)
    # Busy: [30, 88] in step 1 (the union over both threads), [220, 245] in step 2.
    assert parts["device"] == pytest.approx(83e-6)
    assert parts["host"] == pytest.approx(37e-6)
    ops = {o["name"]: o for o in parts["top_ops"]}
    assert [o["name"] for o in parts["top_ops"]] == ["all-reduce.2", "fusion.1", "while.1"]
    assert ops["fusion.1"]["total_ms"] == pytest.approx(0.035)  # 10 + 25 us
    assert ops["while.1"]["total_ms"] == pytest.approx(0.03)  # 40 minus its body
    assert ops["fusion.1"]["source"].endswith("mlp/dot_general")
    assert sum(o["share"] for o in parts["top_ops"]) == pytest.approx(1.0, abs=1e-3)
    assert parts["collective_share"] == pytest.approx(38 / 103)
    # A device's "XLA Ops" line (GPU, TPU) is used alone: no double count with streams.
    gpu = [dict(e, thread="XLA Ops", process="/device:GPU:0") for e in
           prof.read_events(str(path)) if e["name"] == "fusion.1"]
    assert prof.op_events(gpu + [dict(_x("k", 0, 5, hlo_op="k"), thread="Stream #1",
                                      process="/device:GPU:0")]) == gpu
    # Without one: the kernels on the device's streams, not host events naming an op.
    kernel = dict(_x("sm90_gemm", 0, 5, hlo_op="fusion.2"), thread="Stream #7",
                  process="/device:GPU:0")
    launch = dict(_x("cuLaunchKernel", 0, 1, hlo_op="fusion.2"), thread="python",
                  process="/host:CPU")
    assert prof.op_events([kernel, launch]) == [kernel]
    assert prof.top_ops([kernel])[0]["name"] == "fusion.2"  # the HLO op, not the kernel
    assert prof.breakdown([], steps=2) is None  # no spans: the caller uses wall clocks


def test_bottleneck_rules():
    assert prof.bottleneck({"input": 0.3, "device": 0.6, "host": 0.1}, 0.5, cached=False
                           ).startswith("input-bound: the step waits for its batch 30% of "
                                        "the time, so the pipeline supplies 0.70")
    assert "jaxmt data cache" in prof.bottleneck({"input": 0.5, "device": 0.3, "host": 0.2},
                                                 None, cached=False)
    assert "already read" in prof.bottleneck({"input": 0.5, "device": 0.3, "host": 0.2},
                                             None, cached=True)
    assert prof.bottleneck({"input": 0.05, "device": 0.4, "host": 0.55}, 0.5, False
                           ).startswith("host-bound: 55% of the step")
    assert prof.bottleneck({"input": 0.0, "device": 0.9, "host": 0.1}, 0.1, False,
                           collective_share=0.6).startswith("communication-bound")
    assert prof.bottleneck({"input": 0.0, "device": 0.9, "host": 0.1}, 0.38, False
                           ).startswith("compute-bound: MFU 38%")
    low = prof.bottleneck({"input": 0.0, "device": 0.9, "host": 0.1}, 0.05, False,
                          [{"name": "fusion.3", "share": 0.4, "source": "jit(s)/softmax"}])
    assert low.startswith("compute-bound at a low MFU (5.0%)") and "fusion.3" in low


# ---------------------------------------------------------------- the command

def _files(root) -> dict:
    """SHA-1 of every file under ``root`` but the profile."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if os.path.join(d, x) != os.path.join(root, prof.PROFILE_DIR)]
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha1(
                    f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Two steps of a tiny model (scanned layers, 2 microbatches) on 8 fake devices."""
    from jaxmt.train.run import train

    d = str(tmp_path_factory.mktemp("profile") / "model")
    model = cfglib.ModelConfig(vocab_size=512, emb_dim=32, num_heads=2, head_dim=16,
                               mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2,
                               precision="fp32", scan_layers=True)
    train(d, model_cfg=model, mesh_cfg=cfglib.MeshConfig(data=-1),
          data_cfg=cfglib.DataConfig(langs=("en", "de"), vocab_size=500,
                                     vocab_sample_per_lang=1000, src_len=32, tgt_len=32,
                                     max_eval_len=32),
          train_cfg=cfglib.TrainConfig(steps=2, batch_size=16, num_microbatches=2,
                                       warmup_steps=1, log_every=1, checkpoint_every=2),
          progress=False)
    return d


@pytest.mark.slow
def test_profile_command_reports_and_leaves_the_checkpoints_alone(model_dir):
    before = _files(model_dir)
    assert any(p.startswith("checkpoints") for p in before)
    proc = subprocess.run([sys.executable, "-m", "jaxmt.cli", "profile", "--model_dir",
                           model_dir, "--steps", "3", "--json"], cwd=ROOT, text=True,
                          capture_output=True, timeout=600, env=dict(os.environ),
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in r.items() if k != "top_ops"}, indent=1))
    assert r["model_dir"] == model_dir and r["steps"] == 3 and r["step_s"] > 0
    assert "checkpoint step 2" in r["state"]
    f = r["fractions"]
    assert set(f) == {"device", "input", "host"} and all(0 <= v <= 1 for v in f.values())
    assert sum(f.values()) == pytest.approx(1.0, abs=0.05)
    assert r["device_source"] == "trace" and f["device"] > 0
    assert 0 < r["mfu"] <= 1
    assert r["flops_per_step"] > r["scan_flops"] > 0  # scanned layers and microbatches
    assert r["peak_flops"] > 0 and r["device"] and r["num_devices"] == 8
    assert r["mesh"]["data"] == 8
    assert r["top_ops"] and all(o["name"] and o["total_ms"] > 0 and 0 < o["share"] <= 1
                                for o in r["top_ops"])
    assert re.match(r"(input|host|communication|compute)-bound", r["bottleneck"])
    trace_dir = r["trace_dir"]
    assert trace_dir.startswith(os.path.join(model_dir, prof.PROFILE_DIR) + os.sep)
    names = os.listdir(trace_dir)
    assert "perfetto_trace.json.gz" in names and any(n.endswith(".xplane.pb") for n in names)
    # Only DIR/profile is new; the checkpoints and every other file are byte-identical.
    assert _files(model_dir) == before
    assert "profile" in proc.stderr  # the progress bar
