"""JAX's persistent compilation cache for a block of a test (a helper module: the tests
import it by name, as they cannot import a conftest once notebooks/ has one too)."""

import contextlib


@contextlib.contextmanager
def persistent_compile_cache(path):
    """JAX's persistent compilation cache in ``path`` for the block, then as before.

    Each Trainer (and each jax.jit of a new closure) compiles afresh; with the cache, a
    program compiled before in the block (the same HLO, devices and options) is loaded,
    and runs bit-identically. For a module or test whose runs repeat a configuration.
    """
    import jax
    from jax._src import compilation_cache as cc  # reset: set up once per process

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(path))
    jax.config.update(keys[1], 0.0)
    jax.config.update(keys[2], 0)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()
