"""Test set-up: 8 fake CPU devices so sharding is exercised, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu AOT compiles from parallel runs

import pytest  # noqa: E402

BIBLE_LANGS = ("en", "de", "ru")


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A 2000-piece SentencePiece model of the embedded corpus's en, de and ru, trained
    once per session for the data tests (a test module may override the fixture)."""
    from jaxmt.data import vocab

    return vocab.train_vocab(tmp_path_factory.mktemp("vocab") / "spm.model", BIBLE_LANGS,
                             vocab_size=2000, sample_per_lang=2000)
