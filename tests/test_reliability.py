"""Faults a long run meets, with real subprocesses and real signals (tests/fault_worker.py).

* SIGTERM / SIGINT: the step reached is saved, the process exits 0, and a rerun ends
  with the uninterrupted run's parameters, bit for bit; with two processes, both agree.
* ``kill -9`` at random moments, during async saves too: every kill leaves a
  directory that resumes from its newest committed step.
* A corrupt latest checkpoint: a fallback to the newest good step, with a warning;
  none good: a clear error, never a silent fresh start.
* A full disk during a save: a clear error, the earlier steps intact and resumable.

The reference is one uninterrupted worker run; every other run must end equal to it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("fault_worker.py"))
STEPS, EVERY, KEEP = 24, 2, 3
KILL_STEPS = 60  # at most ~6 steps per trial: 10 trials never reach it
TIMEOUT_S = 240


def _env(devices: int = 2) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env


def _args(model_dir, cache, *extra) -> list[str]:
    return [sys.executable, WORKER, f"--model_dir={model_dir}", f"--steps={STEPS}",
            f"--checkpoint_every={EVERY}", f"--keep={KEEP}", f"--xla_cache={cache}", *extra]


# For a run whose own saves nothing checks (a reference, or the rerun that finishes a
# resumed run): one save, at the end. A save never changes the training state (each
# comparison below pits runs that saved at other steps, or not at all, against each
# other, bit for bit), and every save costs about a second on a busy 2-core machine.
ONE_SAVE = f"--checkpoint_every={KILL_STEPS}"


def _run(cmd, devices=2, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(devices), timeout=TIMEOUT_S)
    if check and p.returncode != 0:
        pytest.fail(f"worker failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def _result(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


class Worker:
    """A worker subprocess whose stdout lines are read as they come."""

    def __init__(self, cmd, devices=2):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=_env(devices))
        self.lines: list[str] = []

    def wait_for(self, prefix: str) -> str:
        """Reads stdout until a line starting with ``prefix``; fails on exit first."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                pytest.fail(f"worker exited ({self.p.wait()}) before {prefix!r}:\n"
                            f"{''.join(self.lines)[-2000:]}\n{self.p.stderr.read()[-4000:]}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        pytest.fail(f"no {prefix!r} within {TIMEOUT_S}s")

    def finish(self) -> tuple[int, str, str]:
        out, err = self.p.communicate(timeout=TIMEOUT_S)
        return self.p.returncode, "".join(self.lines) + out, err


def _steps(model_dir) -> list[int]:
    """Committed steps: what Orbax lists (integer directory names; tmp ones are not)."""
    d = Path(model_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _same_params(a: str, b: str) -> None:
    x, y = np.load(a), np.load(b)
    assert sorted(x.files) == sorted(y.files)
    for k in x.files:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted run: its final parameters, and a compile cache for all."""
    root = tmp_path_factory.mktemp("reliability")
    cache = root / "xla_cache"
    out = root / "ref.npz"
    r = _result(_run(_args(root / "ref", cache, f"--out={out}")).stdout)
    assert r["start"] == 0 and r["step"] == STEPS and r["stopped_by"] is None
    return {"root": root, "cache": cache, "out": str(out), "dir": root / "ref"}


def test_sigterm_then_sigint_save_the_step_reached_exit_0_and_resume_exactly(ref, tmp_path):
    d = tmp_path / "run"
    at = 7  # past the step-6 checkpoint, before the step-8 one
    saved = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        w = Worker(_args(d, ref["cache"], "--step_sleep=0.05"))
        w.wait_for(f"batch {at}")
        w.p.send_signal(sig)
        code, out, err = w.finish()
        assert code == 0, err[-3000:]
        r = _result(out)
        stopped = r["stopped_at"]
        assert r["stopped_by"] == sig.name and at <= stopped < STEPS
        assert f"{sig.name}: stopped at step {stopped}; saved checkpoint step {stopped}" in err
        assert stopped in _steps(d)  # the step reached, not only the last interval's
        at = stopped + 3  # odd: between two checkpoints again
        saved.append(stopped)
    res = _result(_run(_args(d, ref["cache"], ONE_SAVE, f"--out={tmp_path / 'end.npz'}"))
                  .stdout)
    assert res["start"] == stopped and res["step"] == STEPS
    _same_params(ref["out"], str(tmp_path / "end.npz"))
    _report(f"SIGTERM then SIGINT: 2 trials, each saved the step reached ({saved}), exit 0; "
            "final parameters bit-identical")


def test_kill_9_at_random_moments_always_leaves_a_resumable_directory(ref, tmp_path):
    # A longer run than the others, so 10 kills can never outlast it; its own reference.
    steps = f"--steps={KILL_STEPS}"
    want = tmp_path / "ref.npz"
    _run(_args(tmp_path / "ref", ref["cache"], steps, ONE_SAVE, f"--out={want}"))
    rng = random.Random(1234)
    d = tmp_path / "run"
    trials, resumed = [], []
    for trial in range(10):
        w = Worker(_args(d, ref["cache"], steps, "--step_sleep=0.04"))
        start = int(w.wait_for("resumed").split()[1])
        assert start == (max(_steps(d)) if _steps(d) else 0)  # the newest committed step
        resumed.append(start)
        w.wait_for(f"batch {start + 1}")  # the first step has compiled and run
        if trial % 2:  # during an async save: right after one starts
            w.wait_for("saving")
            time.sleep(rng.uniform(0.0, 0.03))
        else:  # anywhere in the next few steps
            time.sleep(rng.uniform(0.2, 1.0))
        w.p.kill()  # SIGKILL: no handler, no cleanup
        code, _, err = w.finish()
        assert "unreadable" not in err, err[-3000:]
        trials.append((code, _steps(d)))
    assert [t[0] for t in trials] == [-signal.SIGKILL] * 10, trials
    assert resumed == sorted(resumed) and resumed[-1] > 0, resumed
    assert resumed[-1] < KILL_STEPS - 2 * EVERY  # the kills all landed mid-run
    newest = max(_steps(d))
    res = _result(_run(_args(d, ref["cache"], steps, ONE_SAVE,
                             f"--out={tmp_path / 'end.npz'}")).stdout)
    assert res["start"] == newest and res["step"] == KILL_STEPS
    _same_params(str(want), str(tmp_path / "end.npz"))
    lost = [t[1][-1] if t[1] else 0 for t in trials]
    _report(f"kill -9: 10 trials (5 during an async save); each restart resumed from the "
            f"newest committed step: {resumed[1:]} then {res['start']}; final parameters "
            f"bit-identical; committed steps after each kill {lost}")


def _report(line: str) -> None:
    """One result line per fault (``pytest -s`` shows them; the README quotes them)."""
    print(f"\nRELIABILITY {line}", flush=True)


def _corrupt(step_dir: Path, how: str) -> None:
    files = sorted(p for p in (step_dir / "params").rglob("*") if p.is_file()
                   and p.parent.name == "d" and "ocdbt.process" not in str(p))
    if how == "truncate":
        data = files[0].read_bytes()
        files[0].write_bytes(data[: len(data) // 2])
    elif how == "delete_file":
        (step_dir / "params" / "manifest.ocdbt").unlink()
    elif how == "garbage":
        files[0].write_bytes(os.urandom(files[0].stat().st_size))
    elif how == "missing_item":
        shutil.rmtree(step_dir / "opt_state")


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_step(ref, tmp_path):
    import orbax.checkpoint as ocp

    from jaxmt.checkpoint import Checkpointer

    good = _steps(ref["dir"])
    assert good == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]
    # Every kind of damage to the newest step: Orbax/TensorStore refuse to read it.
    for how in ("truncate", "delete_file", "garbage", "missing_item"):
        d = tmp_path / how
        shutil.copytree(ref["dir"], d)
        _corrupt(d / "checkpoints" / str(STEPS), how)
        ck = Checkpointer(str(d), read_only=True)
        found = ck.restore_latest(lambda s: ck.manager.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore(),
            meta=ocp.args.JsonRestore()))["meta"]["step"])
        assert found == (STEPS - EVERY, STEPS - EVERY), how
    # A rerun of the run on a damaged copy: warns, sets the bad step aside, resumes from
    # the one before, and ends on the uninterrupted run's parameters.
    d = tmp_path / "garbage"
    p = _run(_args(d, ref["cache"], f"--out={tmp_path / 'end.npz'}"))
    assert f"warning: checkpoint step {STEPS} in {d / 'checkpoints'} is unreadable" in p.stderr
    assert f"falling back to step {STEPS - EVERY}" in p.stderr
    assert _result(p.stdout)["start"] == STEPS - EVERY
    _same_params(ref["out"], str(tmp_path / "end.npz"))
    aside = list((d / "unreadable_checkpoints").iterdir())
    assert [a.name.split("-")[0] for a in aside] == [str(STEPS)]  # kept, not deleted
    # No readable step at all: a clear error, and nothing is overwritten.
    d = tmp_path / "all_bad"
    shutil.copytree(ref["dir"], d)
    for s in good:
        _corrupt(d / "checkpoints" / str(s), "garbage")
    before = sorted((str(p), p.stat().st_size) for p in d.rglob("*") if p.is_file())
    p = _run(_args(d, ref["cache"]), check=False)
    assert p.returncode != 0
    assert "no readable checkpoint" in p.stderr and all(f"step {s}:" in p.stderr for s in good)
    assert "resumed 0" not in p.stdout
    assert sorted((str(q), q.stat().st_size) for q in d.rglob("*") if q.is_file()) == before
    _report(f"corrupt step {STEPS} (truncated, deleted, garbage file, missing item): 4 "
            f"trials fell back to step {STEPS - EVERY}; the rerun ended bit-identical; all "
            "steps bad: a clear error, no file changed")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 700 kB tmpfs: room for a few of the worker's checkpoints, not all of them."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_a_save_is_a_clear_error_and_keeps_earlier_steps(ref, tmp_path,
                                                                          tiny_disk):
    d = tiny_disk / "run"
    p = _run(_args(d, ref["cache"], "--keep=20"), check=False)
    assert p.returncode != 0
    err = p.stderr
    assert "the disk is full" in err and "are intact" in err, (
        err[err.find("jaxmt.checkpoint.CheckpointError"):][:2000] or err[-3000:])
    kept = _steps(d)
    assert kept and max(kept) < STEPS
    # More room (the same mount, bigger), and the run resumes from the newest step.
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    res = _result(_run(_args(d, ref["cache"], "--keep=20", ONE_SAVE,
                             f"--out={tmp_path / 'end.npz'}")).stdout)
    assert res["start"] == max(kept) and res["step"] == STEPS
    _same_params(ref["out"], str(tmp_path / "end.npz"))
    _report(f"full disk: a clear error after steps {kept} were committed; they stayed "
            f"intact; with room again the run resumed from step {max(kept)}, bit-identical")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_on_the_preemption_step(ref, tmp_path):
    d = tmp_path / "run"

    def pair(*extra):
        port = _free_port()
        return [Worker(_args(d, ref["cache"], f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}", *extra), devices=1)
                for i in (0, 1)]

    ws = pair("--step_sleep=0.05")
    for w in ws:
        w.wait_for("batch 5")
    ws[1].p.send_signal(signal.SIGTERM)  # the scheduler preempts one host
    results = []
    for w in ws:
        code, out, err = w.finish()
        assert code == 0, err[-3000:]
        results.append(_result(out))
    stopped = {r["stopped_at"] for r in results}
    assert len(stopped) == 1 and {r["stopped_by"] for r in results} == {"SIGTERM"}
    step = stopped.pop()
    assert 5 <= step < STEPS and step in _steps(d)
    ws = pair(ONE_SAVE, f"--out={tmp_path / 'end.npz'}")
    ends = []
    for w in ws:
        code, out, err = w.finish()
        assert code == 0, err[-3000:]
        ends.append(_result(out))
    assert [e["start"] for e in ends] == [step, step]
    assert [e["step"] for e in ends] == [STEPS, STEPS]
    _same_params(ref["out"], str(tmp_path / "end.npz"))  # 2 x 1 devices = 1 x 2, exactly
    _report(f"SIGTERM to 1 of 2 processes: both saved step {step} and exited 0; the "
            "2-process rerun ended bit-identical to the 1-process reference")
