"""Host memory: keep freed memory in the process (glibc), for steady CPU steps.

XLA's CPU runtime allocates each step's temporary buffer afresh (2.55 GB for the
70M-parameter step of ``benchmarks/train_step.py``). glibc serves blocks that large
with mmap and unmaps them on free, so every step page-faults them back in: about
635k minor faults and 0.85 s of system time per 1.8 s step on the 2-core CPU. With
one arena, no mmap for large blocks and no trimming, the memory stays in the process
and is reused (no faults; the step drops to about 1.4 s). The cost: the process never
hands freed heap back to the OS, which is why this is not done at ``import jaxmt``:
the ``jaxmt`` command calls it (opt out with ``JAXMT_MALLOC=default``), and
``benchmarks/train_step.py --malloc tuned`` applies it to both sides alike.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Sets the glibc options; True when they took effect.

    Only allocations made afterwards by threads without an arena yet are affected,
    so call it before the first JAX computation (importing jax first is fine).
    No-op off Linux/glibc or with ``JAXMT_MALLOC=default``.
    """
    if os.environ.get("JAXMT_MALLOC", "tuned") != "tuned" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # mallopt takes an int: -1 becomes SIZE_MAX for the trim threshold (never trim).
    return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                and mallopt(_M_TRIM_THRESHOLD, -1))
