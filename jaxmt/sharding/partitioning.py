"""The Partitioner: owns the device mesh and the logical-axis rules.

Everything that turns logical names into ``NamedSharding``s, and host-local numpy
batches into global arrays, goes through one object, as in T5X.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxmt.config import MeshConfig, ModelConfig
from jaxmt.kernels.common import tracing_for
from jaxmt.sharding import axes

PyTree = Any


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Fills a -1 axis and checks that the product equals the device count.

    Returns:
      ``(replica, data, fsdp, tensor)``.
    """
    sizes = list(cfg.sizes)
    named = lambda: ", ".join(f"{a}={s}" for a, s in zip(axes.MESH_AXES, sizes))
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"MeshConfig({named()}): the fixed axes' product {known} does not divide the "
                f"{num_devices} devices; make it a divisor of {num_devices} or set every "
                f"axis explicitly.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"MeshConfig({named()}) needs {math.prod(sizes)} devices but {num_devices} are "
            f"available; set one axis to -1 or make the product {num_devices}.")
    return tuple(sizes)


def resolve_rules(rules, sizes: dict[str, int], drop: Sequence[str] = ()) -> tuple:
    """The rule table for one mesh: mesh axes of size 1 (and those in ``drop``) removed,
    so specs name only axes that split something. A rule left with no mesh axis maps
    its name to None (replicated) and still takes precedence over later rules."""
    out = []
    for name, mesh_axes in rules:
        if mesh_axes is not None:
            kept = tuple(a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes)
                         if sizes[a] > 1 and a not in drop)
            mesh_axes = None if not kept else kept[0] if len(kept) == 1 else kept
        out.append((name, mesh_axes))
    return tuple(out)


def _device_grid(devices: list[jax.Device], shape: tuple[int, ...]) -> np.ndarray:
    """Devices arranged as the mesh: TPU devices by physical topology (across slices,
    ``replica`` goes over DCN), others in id order, which keeps each process's devices
    together, as ``make_array_from_process_local_data`` needs."""
    if devices[0].platform != "tpu":
        return np.asarray(devices).reshape(shape)
    from jax.experimental import mesh_utils
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        if shape[0] != len(slices):
            raise ValueError(f"MeshConfig.replica={shape[0]} but the devices span "
                             f"{len(slices)} slices; set replica to the number of slices.")
        return mesh_utils.create_hybrid_device_mesh(
            (1,) + shape[1:], (shape[0],) + (1,) * (len(shape) - 1), devices,
            allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of a TPU topology (e.g. ``"v5p:2x2x1"``), for ahead-of-time compiles
    from any machine: pass them to :class:`Partitioner` or a sharding, lower and compile.

    Raises:
        ValueError: libtpu (the ``tpu_aot`` extra) is missing or ``name`` is unknown.
    """
    try:
        from jax.experimental import topologies
        # v4 chips are addressed as one megacore device each (two TensorCores).
        extra = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                 **extra).devices)
    except Exception as e:  # no libtpu, or an unknown topology name
        raise ValueError(f"cannot compile for TPU topology {name!r} ({e}); install the TPU "
                         f"compiler with `pip install -e '.[tpu_aot]'`") from e


def check_model_split(cfg: ModelConfig, sizes: dict[str, int]) -> None:
    """Dimensions a mesh of ``sizes`` (axis -> size) splits must divide evenly.

    No devices needed: :meth:`Partitioner.check_model` and the planner (which checks
    mesh shapes for hardware it does not have) share this.

    Raises:
      ValueError: naming the field, the axis and what to change.
    """
    t, f = sizes["tensor"], sizes["fsdp"]
    need = [("num_heads", cfg.num_heads, t, "tensor"), ("mlp_dim", cfg.mlp_dim, t, "tensor"),
            ("vocab_size", cfg.vocab_size, t, "tensor"), ("emb_dim", cfg.emb_dim, f, "fsdp")]
    for field, value, n, axis in need:
        if value % n:
            lower = max(d for d in range(1, n + 1) if value % d == 0 and n % d == 0)
            raise ValueError(
                f"ModelConfig.{field}={value} is not divisible by the `{axis}` mesh axis "
                f"(MeshConfig.{axis}={n}); make {field} a multiple of {n}, or set "
                f"MeshConfig.{axis}={lower} and give the other devices to `data`.")


def check_batch_split(global_batch: int, data_parallel_size: int,
                      num_microbatches: int = 1) -> None:
    """The batch (each microbatch) must split evenly over ``data_parallel_size`` (replica
    x data x fsdp) devices; no devices needed, as :func:`check_model_split`.

    Raises:
      ValueError: naming TrainConfig.batch_size and the multiple to pick.
    """
    n = data_parallel_size * num_microbatches
    if global_batch % n:
        what = (f"replica x data x fsdp = {data_parallel_size}" if num_microbatches == 1
                else f"replica x data x fsdp x num_microbatches = "
                     f"{data_parallel_size} x {num_microbatches}")
        raise ValueError(
            f"TrainConfig.batch_size={global_batch} is not divisible by {what}; pick a "
            f"multiple of {n}" + ("." if num_microbatches == 1 else
                                  " or change TrainConfig.num_microbatches."))


class Partitioner:
    """Builds the ``(replica, data, fsdp, tensor)`` mesh and maps logical names onto it.

    Attributes:
      shape: the resolved mesh shape.
      rules: the rule table for this mesh (size-1 axes dropped); activations and the
        optimizer state use it.
      param_rules: the same, without ``fsdp`` when ``MeshConfig.shard_params`` is False
        (ZeRO-1 keeps parameters whole).
      platform: the devices' platform, which kernels are traced for (Pallas flash runs
        as the TPU kernel in a compile for a TPU topology, wherever it runs).
    """

    def __init__(self, cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None,
                 rules=axes.RULES):
        devices = list(devices if devices is not None else jax.devices())
        self.cfg = cfg
        self.shape = resolve_mesh_shape(cfg, len(devices))
        # Auto axes: Flax's logical constraints are asserts under Explicit axes.
        self.mesh = Mesh(_device_grid(devices, self.shape), axes.MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(axes.MESH_AXES))
        self.sizes = dict(zip(axes.MESH_AXES, self.shape))
        self.platform = devices[0].platform  # "cpu", "gpu" or "tpu" (also a topology's)
        self._table = tuple(rules)
        self.rules = self.rules_without(())
        self.param_rules = self.rules_without(() if cfg.shard_params else ("fsdp",))

    def rules_without(self, mesh_axes: Sequence[str]) -> tuple:
        """:attr:`rules` with ``mesh_axes`` also dropped (for code that vmaps over them)."""
        return resolve_rules(self._table, self.sizes, drop=tuple(mesh_axes))

    def __repr__(self) -> str:
        mesh = ", ".join(f"{a}={n}" for a, n in self.sizes.items())
        zero = "" if self.cfg.shard_params or self.sizes["fsdp"] == 1 else ", params replicated"
        return f"Partitioner({mesh}{zero})"

    @contextlib.contextmanager
    def _scope(self):
        """Mesh and rules in scope for tracing (constraints resolve against them), and the
        kernels traced for the mesh's platform: an ahead-of-time compile for a TPU
        topology from a CPU host gets the Pallas TPU kernels, not their CPU fallbacks."""
        with (jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules),
              tracing_for(self.platform)):
            yield

    def jit(self, fn: Callable, in_shardings: Any = None, out_shardings: Any = None,
            donate_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = ()
            ) -> "PartitionedFunction":
        """``jax.jit`` of ``fn`` that traces, compiles and runs on this mesh with its rules.

        The one place jaxmt compiles a sharded function: callers never enter the mesh
        themselves. ``None`` shardings let XLA choose (as in ``jax.jit``).

        Returns:
          A callable with ``.lower(*args)`` for ahead-of-time compiles and
          ``.compile_count`` (the shapes compiled so far).
        """
        kw = {} if in_shardings is None else {"in_shardings": in_shardings}
        if out_shardings is not None:
            kw["out_shardings"] = out_shardings
        return PartitionedFunction(jax.jit(fn, donate_argnums=donate_argnums,
                                           static_argnums=static_argnums, **kw), self._scope)

    def eval_shape(self, fn: Callable, *args, **kwargs) -> PyTree:
        """``jax.eval_shape`` under this mesh and rules (logical constraints resolve)."""
        with self._scope():
            return jax.eval_shape(fn, *args, **kwargs)

    @property
    def data_parallel_size(self) -> int:
        """How many ways the batch is split: replica x data x fsdp."""
        return math.prod(self.sizes[a] for a in axes.BATCH_MESH_AXES)

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(P())

    @property
    def batch_spec(self) -> P:
        """Batch rows over the data-like axes, the same mapping ``act_batch`` gets."""
        return nn.logical_to_mesh_axes((axes.ACT_BATCH, axes.ACT_LENGTH), self.rules)

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.sharding(self.batch_spec)

    def logical_shardings(self, boxed_tree: PyTree, params: bool = False) -> PyTree:
        """NamedShardings for a tree whose leaves may be ``nn.LogicallyPartitioned``.

        Args:
          boxed_tree: the tree; unannotated leaves are replicated.
          params: use :attr:`param_rules` (the model parameters) instead of :attr:`rules`.
        """
        specs = nn.get_partition_spec(boxed_tree)
        return nn.logical_to_mesh_sharding(specs, self.mesh,
                                           self.param_rules if params else self.rules)

    def check_model(self, cfg: ModelConfig) -> None:
        """Dimensions the mesh splits must divide evenly; raises before any compile."""
        check_model_split(cfg, self.sizes)

    def check_batch(self, global_batch: int, num_microbatches: int = 1) -> None:
        """The batch (each microbatch) must split evenly over replica x data x fsdp."""
        check_batch_split(global_batch, self.data_parallel_size, num_microbatches)

    def host_local_batch_size(self, global_batch: int) -> int:
        self.check_batch(global_batch)
        return global_batch // jax.process_count()

    def shard_batch(self, local: dict[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
        """Assembles this host's rows into global arrays sharded over the batch axes."""
        out = {}
        for k, v in local.items():
            shape = (global_batch,) + tuple(v.shape[1:])
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v, shape)
        return out


class PartitionedFunction:
    """A jitted function bound to a mesh and rule table (:meth:`Partitioner.jit`)."""

    def __init__(self, jitted, scope: Callable):
        self._jitted = jitted
        self._scope = scope

    def __call__(self, *args, **kwargs):
        with self._scope():
            return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """Lowers for the given (abstract) arguments; ``.compile()`` the result."""
        with self._scope():
            return self._jitted.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        """Traces for the given (abstract) arguments; ``.jaxpr`` is the traced program."""
        with self._scope():
            return self._jitted.trace(*args, **kwargs)

    @property
    def compile_count(self) -> int:
        """How many argument shapes this function has been compiled for."""
        return int(self._jitted._cache_size())
