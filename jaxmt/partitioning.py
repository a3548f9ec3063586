"""The Partitioner: owns the device mesh and the logical-axis rules.

Everything that turns logical names into ``NamedSharding``s, and host-local numpy
batches into global arrays, goes through one object, as in T5X.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxmt import axes
from jaxmt.config import MeshConfig

PyTree = Any


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Fills a -1 axis and checks that the product equals the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"MeshConfig {dict(zip(axes.MESH_AXES, sizes))}: {num_devices} devices are not "
                f"divisible by the fixed axes' product {known}; change the fixed sizes.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"MeshConfig {dict(zip(axes.MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one axis to -1 or make the product {num_devices}.")
    return tuple(sizes)


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of a TPU topology (e.g. ``"v5p:2x2x1"``), for ahead-of-time compiles
    from any machine: pass them to :class:`Partitioner` or a sharding, lower and compile.

    Raises:
        ValueError: libtpu (the ``tpu_aot`` extra) is missing or ``name`` is unknown.
    """
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # no libtpu, or an unknown topology name
        raise ValueError(f"cannot compile for TPU topology {name!r} ({e}); install the TPU "
                         f"compiler with `pip install -e '.[tpu_aot]'`") from e


class Partitioner:
    """Builds the ``(data, fsdp, tensor)`` mesh and maps logical names onto it."""

    def __init__(self, cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None,
                 rules=axes.RULES):
        devices = list(devices if devices is not None else jax.devices())
        self.shape = resolve_mesh_shape(cfg, len(devices))
        # Auto axes: Flax's logical constraints are asserts under Explicit axes.
        self.mesh = Mesh(np.asarray(devices).reshape(self.shape), axes.MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(axes.MESH_AXES))
        self.rules = tuple(rules)

    @contextlib.contextmanager
    def activate(self):
        """Mesh and rules in scope for tracing (constraints resolve against them)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    @property
    def data_parallel_size(self) -> int:
        return self.shape[0] * self.shape[1]

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(P())

    @property
    def batch_sharding(self) -> NamedSharding:
        """Batch rows over data x fsdp, the same mapping ``act_batch`` gets."""
        return self.sharding(nn.logical_to_mesh_axes((axes.ACT_BATCH, axes.ACT_LENGTH), self.rules))

    def logical_shardings(self, boxed_tree: PyTree) -> PyTree:
        """NamedShardings for a tree whose leaves may be ``nn.LogicallyPartitioned``."""
        specs = nn.get_partition_spec(boxed_tree)
        return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

    def check_batch(self, global_batch: int) -> None:
        if global_batch % self.data_parallel_size:
            raise ValueError(
                f"TrainConfig.batch_size={global_batch} is not divisible by data x fsdp = "
                f"{self.data_parallel_size}; pick a multiple of {self.data_parallel_size}.")

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
