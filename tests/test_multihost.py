"""Multi-host: the start-up plan (flags, environment, SLURM/TPU detection), and a real
2-process x 2-CPU-device run on 127.0.0.1 (gloo) that matches 1 process x 4 devices,
whose Orbax checkpoint then restores in a single process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmt import cli
from jaxmt.sharding import multihost

pytestmark = pytest.mark.slow  # `make test-fast` skips these

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
TIMEOUT_S = 300  # per launch; a crashed peer otherwise leaves the other waiting

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[003-004]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


# --- the plan: pure, from flags and a fake environment ------------------------------

def test_no_settings_is_a_single_process():
    p = multihost.plan(env={})
    assert not p.distributed and p.source == "single process"
    # One SLURM task, or a single-host TPU, is still a single process.
    assert not multihost.plan(env=dict(SLURM, SLURM_NTASKS="1")).distributed
    assert not multihost.plan(env={"TPU_WORKER_HOSTNAMES": "localhost"}).distributed
    # A batch script outside `srun` has no job step: not a multi-process launch.
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert not multihost.plan(env=no_step).distributed


def test_explicit_flags_and_environment():
    p = multihost.plan("10.0.0.1:1234", 4, 3, env={})
    assert p == multihost.Plan(True, "flags/environment", "10.0.0.1:1234", 4, 3, None)
    env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    p = multihost.plan(env=env)
    assert (p.distributed, p.coordinator_address, p.num_processes, p.process_id) == (
        True, "h0:99", 2, 1)
    # A flag wins over its variable; the others still come from the environment.
    p = multihost.plan(process_id=0, env=env)
    assert (p.coordinator_address, p.num_processes, p.process_id) == ("h0:99", 2, 0)
    # Explicit settings win over SLURM detection.
    assert multihost.plan(env=dict(SLURM, **env)).source == "flags/environment"
    # One process needs no coordination.
    assert not multihost.plan("h0:1", 1, 0, env={}).distributed


def test_partial_or_bad_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"missing: --num_processes \(or JAX_NUM_PROCESSES\), "
                                         r"--process_id \(or JAX_PROCESS_ID\)"):
        multihost.plan("127.0.0.1:1234", env={})
    with pytest.raises(ValueError,
                       match=r"missing: --coordinator_address \(or JAX_COORDINATOR_ADDRESS\)\."):
        multihost.plan(env={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        multihost.plan("h:1", 2, env={"JAX_PROCESS_ID": "one"})
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        multihost.plan("h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="needs a port"):
        multihost.plan("h", 2, 0, env={})
    with pytest.raises(ValueError, match="cluster_detection='magic'"):
        multihost.plan(cluster_detection="magic", env={})


def test_slurm_and_cloud_tpu_are_detected():
    p = multihost.plan(env=SLURM)
    assert p == multihost.Plan(True, "SLURM", cluster_detection_method="slurm")
    for env in ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"},
                {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"},
                {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1", "TPU_WORKER_HOSTNAMES": "t-0"}):
        p = multihost.plan(env=env)
        # JAX's detection fills in the values (GKE from the environment, GCE from metadata).
        assert p == multihost.Plan(True, "Cloud TPU"), env


def test_cluster_detection_overrides():
    assert not multihost.plan(cluster_detection="off", env=SLURM).distributed
    p = multihost.plan(cluster_detection="auto", env={})
    assert p.distributed and p.cluster_detection_method is None and p.num_processes is None
    # A forced method may take some values from flags and detect the rest.
    p = multihost.plan(coordinator_address="h:7", cluster_detection="gcetpu", env={})
    assert (p.coordinator_address, p.cluster_detection_method) == ("h:7", "gcetpu")


def test_initialize_single_process_starts_nothing():
    import jax

    assert multihost.initialize(env={}) == "single process"
    assert multihost.initialize("h:1", 1, 0, env={}) == "single process (process count 1)"
    assert not jax.distributed.is_initialized()


def test_cli_flags():
    assert cli.CLUSTER_DETECTION == multihost.CLUSTER_DETECTION
    args = cli.build_parser().parse_args(
        ["train", "--model_dir=m", "--coordinator_address=h:1", "--num_processes=2",
         "--process_id=1", "--cluster_detection=off"])
    assert (args.coordinator_address, args.num_processes, args.process_id,
            args.cluster_detection) == ("h:1", 2, 1, "off")
    # Rejected before gin, data or devices are touched.
    with pytest.raises(SystemExit, match="missing: --num_processes"):
        cli.main(["train", "--model_dir=unused", "--coordinator_address=127.0.0.1:1"])


# --- 2 processes x 2 devices against 1 process x 4 devices --------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU_", "MEGASCALE_"))
           and k not in (multihost.ENV_ADDRESS, multihost.ENV_NUM_PROCESSES,
                         multihost.ENV_PROCESS_ID)}
    # Replaces conftest's 8 devices entirely.
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _start(commands: list[list[str]], devices: int, logs: Path) -> list[subprocess.Popen]:
    """Starts the commands; each writes stdout and stderr to files (a full pipe nobody
    reads would stall a process, and with it its peer in a collective)."""
    procs = []
    for c in commands:
        name = logs / f"worker{len(list(logs.glob('*.out')))}"
        with open(f"{name}.out", "w") as out, open(f"{name}.err", "w") as err:
            p = subprocess.Popen(c, stdout=out, stderr=err, text=True, env=_env(devices))
        p.log = name
        procs.append(p)
    return procs


def _finish(procs: list[subprocess.Popen], others: list[subprocess.Popen] = ()) -> list[dict]:
    """Waits for ``procs``; the result line of each, as JSON. On a failure or a
    timeout, kills them and ``others`` and fails with their output."""
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
        failed = any(p.returncode for p in procs)
    except subprocess.TimeoutExpired:
        failed = True
    outs = [(Path(f"{p.log}.out").read_text(), Path(f"{p.log}.err").read_text()) for p in procs]
    if failed:
        for p in [*procs, *others]:
            p.kill()
            p.wait()
        pytest.fail("multihost worker failed or timed out:\n" + "\n".join(
            f"--- {p.args[2:]}: exit {p.returncode}\nstdout: {out[-2000:]}\n"
            f"stderr: {err[-6000:]}" for p, (out, err) in zip(procs, outs)))
    # The last JSON line: gloo also prints connection notes to stdout.
    return [json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
            for out, _ in outs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("seqio")
    from jaxmt.data import vocab

    root = tmp_path_factory.mktemp("multihost")
    spm = vocab.train_vocab(root / "spm.model", ("en", "de"), vocab_size=1000,
                            sample_per_lang=1000)
    out = root / "out"
    out.mkdir()
    common = [sys.executable, WORKER, f"--vocab={spm}", f"--out={out}"]
    port = _free_port()
    done = root / "two_done"
    # The 1-process run trains alongside the pair, then restores their checkpoint once
    # they have exited: less wall time than one after the other.
    [one] = _start([common + [f"--model_dir={root / 'one'}", f"--restore_dir={root / 'two'}",
                              f"--restore_after={done}"]], devices=4, logs=root)
    pair = _start([common + [f"--model_dir={root / 'two'}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"] for i in (0, 1)], devices=2, logs=root)
    two = _finish(pair, others=[one])
    done.touch()
    [one_result] = _finish([one])
    return {"two": two, "one": one_result, "out": out, "root": root}


def test_two_processes_form_one_four_device_run(runs):
    for i, r in enumerate(runs["two"]):
        assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (
            i, 2, 4, 2)
        assert r["where"].startswith(f"process {i} of 2 (coordinator 127.0.0.1:")
        assert r["again"].endswith("already initialized)")  # a second call starts nothing
    one = runs["one"]
    assert (one["process_count"], one["devices"], one["where"]) == (1, 4, "single process")


def test_each_process_reads_its_own_shard_in_process_order(runs):
    p0, p1 = runs["two"]
    one = runs["one"]
    steps = len(one["losses"])
    assert len(p0["local_digests"]) == len(p1["local_digests"]) == steps
    # Different data on the two processes, at every step.
    assert all(a != b for a, b in zip(p0["local_digests"], p1["local_digests"]))
    # The 1-process run read the same two shards ...
    assert [h[0] for h in one["half_digests"]] == p0["local_digests"]
    assert [h[1] for h in one["half_digests"]] == p1["local_digests"]
    # ... and the global batch make_array_from_process_local_data assembled holds
    # process 0's rows first: the same array as the 1-process concatenation.
    assert p0["global_digests"] == p1["global_digests"] == one["global_digests"]


def test_losses_and_parameters_match_one_process(runs):
    p0, p1 = runs["two"]
    one = runs["one"]
    assert p0["losses"] == p1["losses"]  # the loss is one replicated value
    np.testing.assert_allclose(p0["losses"], one["losses"], rtol=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    two_params = np.load(runs["out"] / "p2_params.npz")
    one_params = np.load(runs["out"] / "p1_params.npz")
    assert sorted(two_params.files) == sorted(one_params.files)
    for k in two_params.files:
        np.testing.assert_allclose(two_params[k], one_params[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_process_checkpoint_restores_in_one_process(runs):
    step_dir = runs["root"] / "two" / "checkpoints" / "3"
    # Parameters were split over both processes' devices (fsdp), so both wrote shards.
    names = set(os.listdir(step_dir / "params"))
    assert {"ocdbt.process_0", "ocdbt.process_1", "commit_success.txt"} <= names, names
    one = runs["one"]
    assert (one["restored_step"], one["restored_state_step"]) == (3, 3)
    meta = dict(one["restored_meta"])
    assert meta.pop("train_seconds") > 0  # TrainConfig.max_minutes counts it
    assert meta == {"data_seed": 0, "step": 3, "lr_horizon": 3}  # TrainConfig.steps
    assert one["restored_mesh"]["fsdp"] == 4  # onto the single process's own mesh
    for item in ("params", "opt_state"):
        saved = np.load(runs["out"] / f"p2_{item}.npz")
        restored = np.load(runs["out"] / f"restored_{item}.npz")
        assert sorted(saved.files) == sorted(restored.files)
        for k in saved.files:
            assert restored[k].dtype == saved[k].dtype, k
            np.testing.assert_array_equal(restored[k], saved[k], err_msg=f"{item} {k}")
