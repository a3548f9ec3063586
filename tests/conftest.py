"""Test set-up: 8 fake CPU devices so sharding is exercised, set before jax is imported."""

import os

# LLVM at -O0 unless the caller chose a level: the suite compiles hundreds of small
# programs whose run time is negligible, and -O0 cut the suite from 1,546 s to 1,231 s on
# 2 cores (a test's numerics may differ from -O2's in the last bits, never its semantics).
_opt = ("" if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
        else " --xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + _opt
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu AOT compiles from parallel runs
# One persistent XLA cache for the session: the many tests (and the CLI runs they start)
# that compile the same small programs compile each once (JAX's default: programs that
# took 1 s or more). Set here, before the xdist workers start, so they share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxmt_tests_xla_cache_")

import pytest  # noqa: E402

BIBLE_LANGS = ("en", "de", "ru")


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A 2000-piece SentencePiece model of the embedded corpus's en, de and ru, trained
    once per session for the data tests (a test module may override the fixture)."""
    from jaxmt.data import vocab

    return vocab.train_vocab(tmp_path_factory.mktemp("vocab") / "spm.model", BIBLE_LANGS,
                             vocab_size=2000, sample_per_lang=2000)
