"""``jax.nn.dot_product_attention`` with cuDNN asked for where cuDNN can take the call.

In jax 0.10.2, ``jax.nn.dot_product_attention(implementation=None)`` is XLA everywhere:
cuDNN's fused attention runs only when asked for by name, and then raises on inputs it
cannot take. :func:`dot_product_implementation` decides ahead of the call, from the
constraints jax itself checks (``jax/_src/cudnn/fused_attention_stablehlo.py``:
``check_layout`` and ``check_is_flash_attention``), so unsupported calls fall back to XLA
with a logged reason instead of failing:

* a CUDA GPU (cuDNN does not exist on CPU, TPU or ROCm);
* float16 or bfloat16 inputs (float32 is refused);
* a head dim that is a multiple of 8, at most 128 (256 from compute capability 9.0);
* with a bias, even query and key lengths (refused for training otherwise; the call
  cannot know whether it will be differentiated, so it asks for them always).

jax 0.10.2 exports the bias gradient for any bias shape (``should_export_dbias``), so the
trainable T5 bias is no reason to fall back. Not checked here, because a trace cannot see
them: the cuDNN version and GPU generation rules jax adds at compile time.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_logged: set[str] = set()


def dot_product_implementation(platform: str, dtype, head_dim: int, q_len: int, k_len: int,
                               has_bias: bool, compute_capability: str | None = None
                               ) -> tuple[str, str]:
    """The ``implementation`` to ask ``jax.nn.dot_product_attention`` for, and why.

    Args:
        platform: ``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"cpu"`` (see :func:`platform`).
        dtype: dtype of q, k and v.
        head_dim: size of the last axis of q/k/v.
        q_len, k_len: query and key lengths.
        has_bias: whether an additive bias (or mask) is passed.
        compute_capability: the CUDA device's, e.g. ``"9.0"``; None is treated as pre-Hopper.

    Returns:
        ``("cudnn", "")``, or ``("xla", reason)`` where cuDNN cannot take the call.
    """
    if platform != "cuda":
        return "xla", f"cuDNN needs a CUDA GPU, the platform is {platform}"
    if np.dtype(dtype) not in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16)):
        return "xla", f"cuDNN takes float16/bfloat16 inputs, got {np.dtype(dtype).name}"
    hopper = compute_capability is not None and tuple(
        int(x) for x in compute_capability.split(".")) >= (9, 0)
    max_dim = 256 if hopper else 128
    if head_dim % 8 or head_dim > max_dim:
        return "xla", f"cuDNN needs a head dim that is a multiple of 8, <= {max_dim}, got {head_dim}"
    if has_bias and (q_len % 2 or k_len % 2):
        return "xla", f"cuDNN with a bias needs even lengths, got q {q_len}, k {k_len}"
    return "cudnn", ""


def platform() -> tuple[str, str | None]:
    """(``cuda`` | ``rocm`` | the backend name, the CUDA compute capability or None)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend, None
    dev = jax.devices()[0]
    if "cuda" not in dev.client.platform_version.lower():
        return "rocm", None
    return "cuda", getattr(dev, "compute_capability", None)


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array) -> Array:
    """Unscaled (T5) attention of q [b, q, h, d] over k, v [b, k, h, d] with an additive
    bias [b|1, h|1, q, k]; cuDNN where :func:`dot_product_implementation` allows, else XLA.

    The bias is cast to q's dtype, clamped so float16 keeps masked logits finite.
    """
    plat, cc = platform()
    impl, reason = dot_product_implementation(plat, q.dtype, q.shape[-1], q.shape[1], k.shape[1],
                                              True, cc)
    if reason and reason not in _logged:  # once per reason (the reason names the shape)
        _logged.add(reason)
        log = logging.warning if plat == "cuda" else logging.info  # elsewhere XLA is expected
        log("dot_product attention runs on XLA: %s", reason)
    floor = -0.5 * float(jnp.finfo(q.dtype).max)  # -1e10 would be -inf in float16
    bias = jnp.maximum(bias, floor).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation=impl)
