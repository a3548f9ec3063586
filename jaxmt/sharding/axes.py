"""Logical axis names and the one rule table that maps them onto the mesh.

Parameters carry the names ``vocab, embed, mlp, heads, kv, layers, relpos_buckets``;
activations carry ``act_*`` names. Rules are matched first-to-last: for each array, a
rule applies to a dimension if that dimension is still unassigned and the rule's mesh
axes are still free for that array (Flax's ``logical_to_mesh_axes``). The
:class:`~jaxmt.sharding.partitioning.Partitioner` drops mesh axes of size 1 from every rule, so
the PartitionSpecs it produces name only axes that really split something. Keep one
rule per logical name: the drop happens before matching, so a fallback rule for the
same name would never be reached (``tests/test_partitioning.py`` checks this).

How the presets in ``gin_configs/mesh/`` use the table:

- ``dp``: only ``data`` > 1; weights match nothing, so they are replicated.
- ``zero1``: ``fsdp`` > 1 with ``MeshConfig.shard_params = False``; the optimizer state
  is split by the ``embed -> fsdp`` rule, the parameters are not.
- ``fsdp``: the ``embed -> fsdp`` rule splits every weight matrix (ZeRO-3); XLA
  gathers each layer's weights for its matmuls and reduce-scatters the gradients.
- ``tp``: ``heads``, ``mlp`` and ``vocab`` on ``tensor`` (Megatron): the q/k/v and
  MLP input projections are column-parallel, the attention output and MLP output
  projections row-parallel, so each block's result needs one all-reduce.
- ``replica``: an outer data-parallel axis, across slices or nodes (DCN).
"""

from __future__ import annotations

# Outermost first: `replica` crosses slices/nodes (slow links), `tensor` is innermost
# so that its frequent all-reduces stay between neighbouring devices.
MESH_AXES = ("replica", "data", "fsdp", "tensor")

# Parameter axes.
VOCAB, EMBED, MLP, HEADS, KV, LAYERS, RELPOS = (
    "vocab", "embed", "mlp", "heads", "kv", "layers", "relpos_buckets")
# Parameter axes of the fine-tuning additions: one adapter per routing key, the adapters'
# bottleneck, and LoRA's rank. All small, so replicated; their `embed`, `heads`, `mlp`
# dimensions follow the base weights' rules.
ADAPTER_LANGS, ADAPTER_MLP, LORA_RANK = "adapter_langs", "adapter_mlp", "lora_rank"
# Activation axes.
ACT_BATCH, ACT_LENGTH, ACT_KV_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_length", "act_kv_length", "act_embed", "act_heads", "act_kv",
    "act_mlp", "act_vocab")

# Every data-like mesh axis: the batch is split over all of them.
BATCH_MESH_AXES = ("replica", "data", "fsdp")

# The rule table. Batch goes over every data-like axis; heads, MLP hidden units and the
# vocabulary go over `tensor` (Megatron); the embedding dimension of weights goes over
# `fsdp` (ZeRO-3). Axes mapped to None stay replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (ACT_BATCH, BATCH_MESH_AXES),
    (ACT_LENGTH, None),
    (ACT_KV_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV, None),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (LAYERS, None),
    (RELPOS, None),
    (ADAPTER_LANGS, None),
    (ADAPTER_MLP, None),
    (LORA_RANK, None),
)
