"""TensorFlow as jaxmt's input pipelines use it: hidden from accelerators, same options.

Every module of :mod:`jaxmt.data` that needs TensorFlow imports it through here, so
TF never claims GPU memory that JAX needs, and the on-the-fly stream
(:mod:`jaxmt.data.pipeline`) and the reader of the pre-tokenised cache
(:mod:`jaxmt.data.cache`) stay deterministic within the same thread budget.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402


def _hide_accelerators_from_tf() -> None:
    """TF only feeds data; it must never claim GPU memory that JAX needs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was already initialised by someone else; nothing to undo
        pass


_hide_accelerators_from_tf()


def options(threads: int) -> tf.data.Options:
    """Deterministic tf.data options on a private pool of ``threads`` threads."""
    opts = tf.data.Options()
    # A private pool keeps tf.data from spreading over every core the trainer needs.
    opts.threading.private_threadpool_size = threads
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.cpu_budget = threads
    opts.deterministic = True
    return opts
