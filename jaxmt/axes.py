"""Logical axis names and the one rule table that maps them onto the mesh.

Parameters carry the names ``vocab, embed, mlp, heads, kv, layers, relpos_buckets``;
activations carry ``act_*`` names. Rules are matched first-to-last: the first rule
whose mesh axis is still free for a given array wins, as in Flax's
``logical_to_mesh_axes``.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
VOCAB, EMBED, MLP, HEADS, KV, LAYERS, RELPOS = (
    "vocab", "embed", "mlp", "heads", "kv", "layers", "relpos_buckets")
# Activation axes.
ACT_BATCH, ACT_LENGTH, ACT_KV_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_length", "act_kv_length", "act_embed", "act_heads", "act_kv",
    "act_mlp", "act_vocab")

# The rule table. Batch goes over every data-like axis; heads, MLP hidden units and the
# vocabulary go over `tensor` (Megatron); the embedding dimension of weights goes over
# `fsdp` (ZeRO-3). Axes not listed (or mapped to None) stay replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (ACT_BATCH, ("data", "fsdp")),
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
)
