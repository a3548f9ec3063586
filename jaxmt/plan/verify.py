"""Checks a candidate by compiling its training step ahead of time for the target.

Nothing runs and nothing is allocated: :meth:`jaxmt.train.trainer.Trainer.compile_step`
lowers the step for abstract state on the target's devices and XLA compiles it. Where
the devices come from:

* ``tpu-*``: the topology's chips from libtpu (the ``tpu_aot`` extra), on any machine;
  a candidate that does not fit fails to compile (RESOURCE_EXHAUSTED).
* ``cpu:N``: N of this process's CPU devices (fake ones: set
  ``--xla_force_host_platform_device_count`` before JAX starts).
* GPUs: no compile-only path is installed (``jax[cuda12-local]`` would need CUDA's
  libraries' plugin built for this jaxlib; the stack notes record that it works, without
  an out-of-memory check). :func:`target_devices` says so.

On a TPU target ``flash`` compiles as the Pallas TPU (Mosaic) kernel a run would use:
the Partitioner traces kernels for its devices' platform, not this machine's CPU.
(Until 2026-12-07 it compiled as its ``blockwise`` twin, which XLA does not fuse as
it does the kernel: tiny at 16x512 on v5e:2x2 took 1,897.7 MiB that way, 211.9 MiB
with the kernel.)
"""

from __future__ import annotations

import os
import time

import jax

from jaxmt.plan.memory import compiled_bytes, compiled_flops
from jaxmt.plan.targets import Target
from jaxmt.plan.workload import Candidate, Workload
from jaxmt.sharding.partitioning import Partitioner
from jaxmt.train.trainer import Trainer


def target_devices(target: Target) -> list[jax.Device]:
    """The target's devices for an ahead-of-time compile.

    Raises:
      ValueError: the target cannot be compiled for here, with the reason.
    """
    if target.kind == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.num_devices:
            raise ValueError(
                f"{target.text}: this process has {len(devices)} CPU devices; start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices}")
        return devices[:target.num_devices]
    if target.kind == "tpu":
        # Compiling takes no TPU: don't let libtpu's machine-wide lock refuse it because
        # another process (a test, a benchmark) has libtpu loaded too.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from jax.experimental import topologies
        try:
            return list(topologies.get_topology_desc(**target.topology_kwargs()).devices)
        except Exception as e:  # no libtpu, or a topology it does not know
            raise ValueError(f"cannot compile for {target.text} ({e}); install the TPU "
                             f"compiler with `pip install -e '.[tpu_aot]'`") from e
    raise ValueError(
        f"{target.text}: no compile-only path for GPUs is installed here (a CUDA PJRT "
        f"plugin matching this jaxlib is needed, and even then XLA has no out-of-memory "
        f"check for GPU compiles); the prediction stands unverified")


def compile_candidate(w: Workload, c: Candidate, target: Target,
                      devices: list[jax.Device] | None = None) -> dict:
    """Compiles ``w``'s step under ``c`` for ``target`` and reads XLA's figures.

    Returns:
      ``compiled_bytes_per_device`` (:func:`jaxmt.plan.memory.compiled_bytes`),
      ``peak_bytes`` (XLA's peak; meaningful on TPU only), ``argument_bytes``,
      ``temp_bytes``, ``output_bytes``, ``alias_bytes``, ``flops`` (None where XLA gives
      none) and ``compile_s``.

    Raises:
      ValueError: the target cannot be compiled for here, or the mesh does not suit the
        model or batch.
      jax.errors.JaxRuntimeError: XLA refused it (on TPU, RESOURCE_EXHAUSTED: it does not
        fit).
    """
    devices = devices if devices is not None else target_devices(target)
    w = c.apply(w)
    part = Partitioner(c.mesh_config(), devices=devices)
    trainer = Trainer(w.model, w.train, part, w.src_len, w.tgt_len)
    t0 = time.perf_counter()
    compiled = trainer.compile_step(w.src_len, w.tgt_len)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return {"compiled_bytes_per_device": compiled_bytes(mem),
            # TPU: XLA's liveness-aware peak (base on v5e:4x4: 13.74 GiB against a
            # 16.99 GiB sum), which with remat="offload" counts the host copies too.
            # CPU: the arguments alone, not a peak.
            "peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "flops": compiled_flops(compiled),
            "compile_s": round(compile_s, 1)}
