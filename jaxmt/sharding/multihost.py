"""Multi-process start-up: when and how to call ``jax.distributed.initialize``.

Every process of a multi-host run calls :func:`initialize` before anything touches
JAX devices. Where the settings come from, first match wins:

1. Flags (``jaxmt train --coordinator_address=... --num_processes=... --process_id=...``),
   each falling back to its environment variable (``JAX_COORDINATOR_ADDRESS``,
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Either all three are set or none is.
2. A SLURM job step with more than one task (launched with ``srun``), or a Cloud TPU
   with several hosts (``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` listing more
   than one, or ``MEGASCALE_COORDINATOR_ADDRESS`` for multislice): JAX's own cluster
   detection fills the values in.
3. Otherwise a single process, and ``jax.distributed`` is not started.

``cluster_detection`` changes this: ``"off"`` never initializes (a way to run one
process inside a multi-task allocation), ``"auto"``
always calls ``jax.distributed.initialize()`` and lets JAX detect everything (e.g. on
a GCE TPU VM, whose worker list lives in the metadata server, not the environment),
and a JAX method name (``"slurm"``, ``"gcetpu"``, ``"gketpu"``, ``"ompi"``,
``"mpi4py"``) forces that method; with a method, flags given are passed through and
the method fills the rest.

Under SLURM, JAX assumes one task per GPU: each process sees only the GPU numbered by
its ``SLURM_LOCALID``. With one task per node instead, set ``JAX_LOCAL_DEVICE_IDS``
(e.g. ``0,1,2,3,4,5,6,7``) so each process keeps all of its node's GPUs.

:func:`plan` is pure (flags + an environment mapping), so every case is unit-tested
without starting anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

log = logging.getLogger(__name__)

# JAX's cluster detection methods (jax/_src/clusters/*.py ``name``), plus our two words.
DETECTION_METHODS = ("slurm", "ompi", "mpi4py", "gcetpu", "gketpu")
CLUSTER_DETECTION = ("auto", "off") + DETECTION_METHODS

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# What jax's SlurmCluster.is_env_present checks; SLURM_STEP_NODELIST exists only inside
# a job step (srun), so a batch script running python directly is not mistaken for one.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
TPU_HOST_LIST_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
TPU_MULTISLICE_VAR = "MEGASCALE_COORDINATOR_ADDRESS"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`initialize` will do.

    Attributes:
      distributed: whether ``jax.distributed.initialize`` is called.
      source: where the decision came from ("flags/environment", "SLURM", "Cloud TPU",
        "cluster_detection=...", or "single process").
      coordinator_address, num_processes, process_id: explicit values; None leaves
        them to JAX's cluster detection.
      cluster_detection_method: passed to JAX (None: JAX tries every method it knows).
    """

    distributed: bool
    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster_detection_method: str | None = None


def _int_setting(value: int | str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _explicit(coordinator_address, num_processes, process_id, env: Mapping[str, str]):
    """Each setting from its flag, else its environment variable; with the names used."""
    settings = []
    for value, flag, var, conv in (
            (coordinator_address, "--coordinator_address", ENV_ADDRESS, str),
            (num_processes, "--num_processes", ENV_NUM_PROCESSES, int),
            (process_id, "--process_id", ENV_PROCESS_ID, int)):
        name = flag
        if value is None or value == "":
            value, name = env.get(var) or None, var
        if conv is int:
            value = _int_setting(value, name)
        settings.append((value, flag, var))
    return settings


def _slurm_tasks(env: Mapping[str, str]) -> int:
    if not all(v in env for v in SLURM_VARS):
        return 0
    return _int_setting(env["SLURM_NTASKS"], "SLURM_NTASKS") or 0


def _tpu_multihost(env: Mapping[str, str]) -> bool:
    if env.get(TPU_MULTISLICE_VAR):
        return True
    for var in TPU_HOST_LIST_VARS:
        if var in env:  # jax reads the first one set, in this order
            return len([h for h in env[var].split(",") if h.strip()]) > 1
    return False


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, cluster_detection: str | None = None,
         env: Mapping[str, str] | None = None) -> Plan:
    """Decides how this process joins the run; starts nothing (see the module docstring).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: Number of processes in the run.
      process_id: This process's index, in ``[0, num_processes)``.
      cluster_detection: None (the rules above), ``"auto"``, ``"off"``, or one of
        :data:`DETECTION_METHODS`.
      env: The environment to read (default ``os.environ``).

    Returns:
      The :class:`Plan`.

    Raises:
      ValueError: Some but not all of address, count and id are set (the message names
        the missing flags and variables), a value is malformed or out of range, or
        ``cluster_detection`` is unknown.
    """
    env = os.environ if env is None else env
    if cluster_detection not in (None,) + CLUSTER_DETECTION:
        raise ValueError(f"cluster_detection={cluster_detection!r}: choose one of "
                         f"{CLUSTER_DETECTION}")
    if cluster_detection == "off":
        return Plan(False, "cluster_detection=off")
    settings = _explicit(coordinator_address, num_processes, process_id, env)
    (address, _, _), (count, _, _), (pid, _, _) = settings
    given = [s for s in settings if s[0] is not None]
    if cluster_detection is not None:  # "auto" or a method: JAX fills in what is unset
        method = None if cluster_detection == "auto" else cluster_detection
        return Plan(True, f"cluster_detection={cluster_detection}", address, count, pid, method)
    if given:
        missing = [f"{flag} (or {var})" for value, flag, var in settings if value is None]
        if missing:
            raise ValueError(
                "a multi-process run needs the coordinator address, the process count and "
                f"this process's id; missing: {', '.join(missing)}. Set all three, or none "
                "(single process, or SLURM / Cloud TPU detection).")
        if ":" not in address:
            raise ValueError(f"coordinator address {address!r} needs a port: host:port")
        if count < 1 or not 0 <= pid < count:
            raise ValueError(f"process id {pid} is not in [0, {count}) (process count {count})")
        if count == 1:  # nothing to coordinate with
            return Plan(False, "single process (process count 1)")
        return Plan(True, "flags/environment", address, count, pid)
    if _slurm_tasks(env) > 1:
        return Plan(True, "SLURM", cluster_detection_method="slurm")
    if _tpu_multihost(env):
        return Plan(True, "Cloud TPU")
    return Plan(False, "single process")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cluster_detection: str | None = None,
               env: Mapping[str, str] | None = None, initialization_timeout: int = 300) -> str:
    """Starts ``jax.distributed`` when :func:`plan` says so; call before using devices.

    Idempotent: if ``jax.distributed`` is already running, nothing is started again.
    Arguments are those of :func:`plan`; ``initialization_timeout`` (seconds) bounds the
    wait for the other processes.

    Returns:
      One line for the log, e.g. ``"process 1 of 2 (coordinator 10.0.0.2:1234, from
      flags/environment)"`` or ``"single process"``.
    """
    import jax

    if jax.distributed.is_initialized():
        return _describe(jax, "already initialized")
    p = plan(coordinator_address, num_processes, process_id, cluster_detection, env)
    if not p.distributed:
        return p.source
    env = os.environ if env is None else env
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        # Cross-process collectives on the CPU backend (CPU-only runs and tests) go over
        # gloo; without it every process sees only its own devices. No effect on GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=p.coordinator_address, num_processes=p.num_processes,
        process_id=p.process_id, cluster_detection_method=p.cluster_detection_method,
        initialization_timeout=initialization_timeout)
    line = _describe(jax, f"from {p.source}")
    log.info("jax.distributed: %s", line)
    return line


def _describe(jax, how: str) -> str:
    try:  # the address JAX settled on, detected or given; private, so optional
        from jax._src.distributed import global_state
        address = global_state.coordinator_address
    except (ImportError, AttributeError):
        address = "unknown"
    return (f"process {jax.process_index()} of {jax.process_count()} "
            f"(coordinator {address}, {how})")
