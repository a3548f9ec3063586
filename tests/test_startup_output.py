"""A plain start prints no library noise: no libtpu errors or TPU warnings on a machine
without a TPU, and no TensorFlow/absl INFO preamble (see the ``jaxmt`` package docstring).

Each case runs a fresh interpreter with the user's environment, not the test one:
``JAX_PLATFORMS``, ``TF_CPP_MIN_LOG_LEVEL`` and the fake-device ``XLA_FLAGS`` that
tests/conftest.py sets are removed, so JAX discovers its backends as it would for a user.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jaxmt

ROOT = Path(__file__).resolve().parent.parent
# What libtpu, absl and TensorFlow print when they start up where they should not.
NOISE = re.compile(r"E0000|[IWE]\d{4} \d\d:\d\d|TPU|libtpu|InitGoogle|absl::InitializeLog")
NO_TPU_HERE = (importlib.util.find_spec("libtpu") is not None
               and not jaxmt._tpu_may_be_present() and sys.platform.startswith("linux"))


def user_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (
        "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS", "JAXMT_DEBUG")}
    return dict(env, **extra)


def run(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env=user_env() if env is None else env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def noisy_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [l for l in (out.stdout + out.stderr).splitlines() if NOISE.search(l)]


def test_jax_starts_quietly_after_importing_jaxmt():
    out = run([sys.executable, "-c", "import os, jaxmt, jax; print(jax.devices()[0].platform, "
               "os.environ.get('JAX_PLATFORMS'))"])
    assert not noisy_lines(out), out.stderr
    platform, chosen = out.stdout.split()
    if NO_TPU_HERE:  # what JAX would have ended on, without loading libtpu to find out
        assert (platform, chosen) == ("cpu", "cpu")


@pytest.mark.skipif(not NO_TPU_HERE, reason="needs libtpu installed on a machine without a TPU")
def test_jax_imported_first_is_configured_not_its_environment():
    out = run([sys.executable, "-c", "import os, jax, jaxmt; print(jax.config.jax_platforms, "
               "os.environ.get('JAX_PLATFORMS')); jax.devices()"])
    assert out.stdout.split() == ["cpu", "None"]
    assert not noisy_lines(out), out.stderr


@pytest.mark.parametrize("value", ["", "cpu,tpu"])
def test_a_jax_platforms_the_user_set_wins(value):
    """Even the empty value (JAX's "choose for me") is left as it is."""
    out = run([sys.executable, "-c", "import os, jaxmt; print(repr(os.environ['JAX_PLATFORMS']))"],
              env=user_env(JAX_PLATFORMS=value))
    assert out.stdout.strip() == repr(value)


def test_tensorflow_import_filter_drops_info_only():
    noise = ["WARNING: All log messages before absl::InitializeLog() is called are written to "
             "STDERR",
             "I0000 00:00:1796578694.226886    7873 port.cc:153] oneDNN custom operations are on.",
             "I0000 00:00:1796578694.227197    7873 cudart_stub.cc:31] Could not find cuda "
             "drivers on your machine, GPU will not be used.",
             "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
             "TensorFlow with the appropriate compiler flags."]
    kept = ["W0000 00:00:1796578694.2 7873 cuda_blas.cc:1407] Unable to register cuBLAS",
            "E0000 00:00:1796578694.2 7873 cuda_dnn.cc:8579] Unable to register cuDNN",
            "/x/tensorflow/__init__.py:1: UserWarning: something real"]
    assert all(jaxmt._TF_IMPORT_NOISE.match(l) for l in noise)
    assert not any(jaxmt._TF_IMPORT_NOISE.match(l) for l in kept)


@pytest.mark.slow
def test_tensorflow_after_jax_prints_nothing():
    """A notebook's order: JAX first (it sets TF_CPP_MIN_LOG_LEVEL=1 when unset), then
    TensorFlow through jaxmt's data modules (seqio; tfdata hides the GPUs from TensorFlow,
    which calls cuInit: an error line where CUDA libraries exist without a GPU)."""
    out = run([sys.executable, "-c", "import jax, jaxmt; jax.devices(); "
               "from jaxmt.data import tasks, tfdata"])
    assert not noisy_lines(out), out.stderr


@pytest.mark.slow
def test_a_cli_training_run_prints_no_startup_noise(tmp_path):
    """`jaxmt train` (one step of a very small model) imports TensorFlow through seqio and
    starts JAX: its whole output has no libtpu, TPU or absl line."""
    script = Path(sys.executable).with_name("jaxmt")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "jaxmt.cli"]
    out = run(cmd + [
        "train", "--gin_file=runs/demo.gin", f"--model_dir={tmp_path / 'run'}",
        "--gin.LANGS=('en', 'de')", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16",
        "--gin.DataConfig.vocab_size=400", "--gin.DataConfig.vocab_sample_per_lang=300",
        "--gin.ModelConfig.vocab_size=512", "--gin.ModelConfig.emb_dim=32",
        "--gin.ModelConfig.mlp_dim=64", "--gin.ModelConfig.num_heads=2",
        "--gin.ModelConfig.head_dim=16", "--gin.ModelConfig.num_encoder_layers=1",
        "--gin.ModelConfig.num_decoder_layers=1", "--gin.TrainConfig.log_every=1",
        "--gin.TrainConfig.checkpoint_every=1"], timeout=600)
    assert "train finished" in out.stdout, out.stdout[-2000:]
    assert not noisy_lines(out), "\n".join(noisy_lines(out))
