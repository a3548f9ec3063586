"""seqio Tasks (one per translation direction) and their temperature-sampled Mixture.

Every direction is ``pivot -> xx`` or ``xx -> pivot``. A Task's examples are the
in-memory pairs of :func:`jaxmt.data.corpora.parallel_pairs`, with the source
tagged by :func:`jaxmt.data.corpora.tag_source` (``"<2de> ..."``) before
tokenisation, so the model reads the target language from the first input id.

seqio notes that shaped this module:

* ``FunctionDataSource`` cannot shard itself; seqio then loads the whole split and
  calls ``ds.shard`` on examples, which is what we want for a small in-memory corpus.
* seqio caches a split in memory when ``num_input_examples < 10000 * num_shards``,
  *after* the source. A source that shuffles would then replay its first epoch's
  order forever, so :mod:`jaxmt.data.pipeline` passes ``try_in_mem_cache=False``.
* Registries are process-global and refuse duplicate names, so :func:`register`
  removes its own names first; calling it again (tests, notebooks) is safe.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from jaxmt.config import directions  # noqa: E402
from jaxmt.data import corpora, vocab  # noqa: E402

log = logging.getLogger(__name__)

SPLITS = corpora.SPLITS
# Skip reports of the last registration, per task name and split.
SKIP_REPORTS: dict[str, dict[str, corpora.SkipReport]] = {}


def _hide_accelerators_from_tf() -> None:
    """TF only feeds data; it must never claim GPU memory that JAX needs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was already initialised by someone else; nothing to undo
        pass


_hide_accelerators_from_tf()


class _UncachedSourceWarning(logging.Filter):
    """Drops seqio's per-task "uncached FunctionDataset" warning.

    It warns that such a source shuffles poorly; ours reshuffles the whole split
    every epoch (see ``_dataset_fn``), so the warning is noise in training logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_UncachedSourceWarning())


def mixture_rates(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """Temperature sampling rates: ``rate_i ∝ n_i ** (1 / temperature)``, summing to 1.

    ``temperature=1`` samples in proportion to size; larger values move towards
    uniform, which up-samples the smaller directions.

    Raises:
        ValueError: Non-positive temperature, no sizes, a negative size, or all zero.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not sizes:
        raise ValueError("mixture_rates needs at least one size")
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"sizes must be non-negative, got {dict(sizes)}")
    weights = {k: float(n) ** (1.0 / temperature) for k, n in sizes.items()}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"all sizes are zero: {dict(sizes)}")
    return {k: w / total for k, w in weights.items()}


def task_name(prefix: str, src: str, tgt: str) -> str:
    return f"{prefix}_{src}_{tgt}"


def _dataset_fn(src: str, tgt: str):
    """The FunctionDataSource callback for one direction (texts built on first use)."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        pairs, _ = corpora.parallel_pairs(src, tgt, split)
        ds = tf.data.Dataset.from_tensor_slices({
            "inputs": tf.constant([corpora.tag_source(s, tgt) for s, _ in pairs], tf.string),
            "targets": tf.constant([t for _, t in pairs], tf.string),
        })
        if shuffle_files:
            # A full shuffle of the strings is cheap here, and reshuffles every epoch.
            # seqio hands every task of a mixture the same seed; mixing in the direction
            # keeps en->de and en->fr from walking the verses in the same order (which
            # would fill a batch with one verse in several languages).
            if seed is not None:
                seed = (seed * 1_000_003 + zlib.crc32(f"{src}-{tgt}".encode())) % 2**31
            ds = ds.shuffle(max(1, len(pairs)), seed=seed, reshuffle_each_iteration=True)
        return ds

    return dataset_fn


def _validate(langs: Sequence[str], pivot: str, temperature: float) -> None:
    corpora._check_langs(langs)
    if len(set(langs)) != len(langs):
        raise ValueError(f"duplicate languages in {tuple(langs)}")
    if len(langs) < 2:
        raise ValueError(f"need at least two languages, got {tuple(langs)}")
    if pivot not in langs:
        raise ValueError(f"pivot {pivot!r} is not in langs {tuple(langs)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def register(vocab_path: str | Path, langs: Sequence[str], pivot: str = "en",
             temperature: float = 5.0, prefix: str = "jaxmt_bible") -> str:
    """Registers one Task per direction and a Mixture over them.

    Tasks are named ``f"{prefix}_{src}_{tgt}"`` and have splits train, validation and
    test. The Mixture ``f"{prefix}_mix"`` samples their train splits with
    :func:`mixture_rates` of the train pair counts. Each Task's features are
    ``inputs`` and ``targets`` (token ids, EOS appended after trimming) plus
    ``inputs_pretokenized`` and ``targets_pretokenized`` (the strings).

    Any Task of this prefix over embedded languages, and the Mixture, are removed
    first, so the registry afterwards holds exactly this call's directions.
    Skip reports are kept in :data:`SKIP_REPORTS`.

    Args:
        vocab_path: SentencePiece model from :func:`jaxmt.data.vocab.train_vocab`.
        langs: Languages; must include ``pivot``.
        pivot: The language every direction starts or ends in.
        temperature: Mixture temperature (1 = proportional to size).
        prefix: Name prefix for the Tasks and the Mixture.

    Returns:
        The Mixture's name.
    """
    _validate(langs, pivot, temperature)
    if not os.path.exists(vocab_path):
        raise FileNotFoundError(f"{vocab_path}: no SentencePiece model there")
    mixture = f"{prefix}_mix"
    seqio.MixtureRegistry.remove(mixture)
    for a in corpora.EMBEDDED_LANGS:
        for b in corpora.EMBEDDED_LANGS:
            seqio.TaskRegistry.remove(task_name(prefix, a, b))
            SKIP_REPORTS.pop(task_name(prefix, a, b), None)

    spm_vocab = vocab.seqio_vocabulary(vocab_path)
    features = {k: seqio.Feature(vocabulary=spm_vocab, add_eos=True, required=True)
                for k in ("inputs", "targets")}
    train_sizes = {}
    for src, tgt in directions(langs, pivot):
        name = task_name(prefix, src, tgt)
        reports = {split: corpora.parallel_pairs(src, tgt, split)[1] for split in SPLITS}
        SKIP_REPORTS[name] = reports
        train_sizes[name] = reports["train"].kept
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                _dataset_fn(src, tgt), splits=SPLITS,
                num_input_examples={s: r.kept for s, r in reports.items()}),
            preprocessors=[
                seqio.preprocessors.tokenize,  # keeps the strings as *_pretokenized
                seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim,
            ],
            output_features=features,
            metric_fns=[],
        )
    rates = mixture_rates(train_sizes, temperature)
    seqio.MixtureRegistry.add(mixture, sorted(rates.items()))
    reports = [r for n in train_sizes for r in SKIP_REPORTS[n].values()]
    log.info("registered %s: %d tasks, train pairs %s, rates %s, %d pairs skipped (%s)",
             mixture, len(train_sizes),
             {n.removeprefix(prefix + "_"): k for n, k in train_sizes.items()},
             {n.removeprefix(prefix + "_"): round(r, 4) for n, r in rates.items()},
             sum(sum(r.skipped.values()) for r in reports),
             "; ".join(r.summary() for r in reports if r.kept < r.total) or "none")
    return mixture
