"""seqio Tasks (one per translation direction) and their temperature-sampled Mixture.

Every direction is ``pivot -> xx`` or ``xx -> pivot``. A Task's examples are the
in-memory pairs of :func:`jaxmt.data.embedded.parallel_pairs`, with the source
tagged by :func:`jaxmt.data.embedded.tag_source` (``"<2de> ..."``) before
tokenisation, so the model reads the target language from the first input id.

seqio notes that shaped this module:

* ``FunctionDataSource`` cannot shard itself; seqio then loads the whole split and
  calls ``ds.shard`` on examples, which is what we want for a small in-memory corpus.
* seqio caches a split in memory when ``num_input_examples < 10000 * num_shards``,
  *after* the source. A source that shuffles would then replay its first epoch's
  order forever, so :mod:`jaxmt.data.pipeline` passes ``try_in_mem_cache=False``.
* Registries are process-global and refuse duplicate names, so :func:`register`
  removes its own names first; calling it again (tests, notebooks) is safe.

:func:`register_corpus` does the same for the user's own files
(:class:`jaxmt.data.sources.CorpusSource`), for any language pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import zlib
from pathlib import Path
from typing import Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import seqio  # noqa: E402
from jaxmt.data.tfdata import tf  # noqa: E402  (hidden from accelerators there)

from jaxmt.data import distilled, embedded, signals, sources, vocab  # noqa: E402
from jaxmt.data import mixture as mixlib  # noqa: E402
from jaxmt.data.mixture import directions  # noqa: E402

log = logging.getLogger(__name__)

SPLITS = embedded.SPLITS
# Skip reports of the last registration, per task name and split: embedded.SkipReport
# for the embedded corpus, sources.Report (same total/kept/skipped/summary()) for files.
SKIP_REPORTS: dict[str, dict[str, embedded.SkipReport | sources.Report]] = {}


class _UncachedSourceWarning(logging.Filter):
    """Drops seqio's per-task "uncached FunctionDataset" warning.

    It warns that such a source shuffles poorly; ours reshuffles the whole split
    every epoch (see ``_dataset_fn``), so the warning is noise in training logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_UncachedSourceWarning())


def mixture_rates(sizes: Mapping[str, int], temperature: float,
                  caps: Mapping[str, int | None] | None = None,
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Mixture rates summing to 1: ``rate_i ∝ min(n_i, cap_i) ** (1 / temperature)``.

    ``temperature=1`` samples in proportion to size; larger values move towards
    uniform, which up-samples the smaller directions. ``caps`` limit the size a key
    counts as; ``weights`` give keys a fixed share of the mixture, the other keys
    sharing the rest by temperature (relative weights if every key has one). See
    :func:`jaxmt.data.mixture.mixture_rates`.

    Raises:
        ValueError: Non-positive temperature, no sizes, a negative size, all zero,
            or a bad cap or weight.
    """
    return mixlib.mixture_rates(sizes, temperature, caps, weights)


@dataclasses.dataclass(frozen=True)
class MixtureInfo:
    """How a registered Mixture's rates came about (``jaxmt data mixture`` reads it).

    Attributes:
        directions: Task name -> ``(src, tgt)``.
        counted: Task name -> the train size its rate counted (after caps).
        explicit: Task names whose rate is an explicit weight.
        temperature: The mixture temperature.
    """

    directions: dict[str, tuple[str, str]]
    counted: dict[str, int]
    explicit: frozenset[str]
    temperature: float


# The last registration of each Mixture name.
MIXTURES: dict[str, MixtureInfo] = {}


def _rates(mixture: str, names: Mapping[tuple[str, str], str], train_sizes: Mapping[str, int],
           temperature: float, mixture_cap: int, mixture_caps, mixture_weights,
           ) -> dict[str, float]:
    """Rates of a Mixture's tasks from the DataConfig mixture fields; records MIXTURES."""
    caps, weights = mixlib.resolve(list(names), mixture_cap, mixture_caps, mixture_weights,
                                   owner="")
    missing = [mixlib.direction_key(*d) for d in weights if names[d] not in train_sizes]
    if missing:
        raise ValueError(f"mixture_weights: {missing} have no train pairs")
    by_task = {names[d]: d for d in names if names[d] in train_sizes}
    task_caps = {t: caps[d] for t, d in by_task.items()}
    task_weights = {names[d]: w for d, w in weights.items()}
    rates = mixture_rates(train_sizes, temperature, task_caps, task_weights)
    MIXTURES[mixture] = MixtureInfo(
        directions=by_task,
        counted={t: min(n, task_caps[t] or n) for t, n in train_sizes.items()},
        explicit=frozenset(task_weights), temperature=temperature)
    return rates


def task_name(prefix: str, src: str, tgt: str) -> str:
    return f"{prefix}_{src}_{tgt}"


def _dataset_fn(src: str, tgt: str, template: str = signals.TAG_TEMPLATE):
    """The FunctionDataSource callback for one direction (texts built on first use)."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        pairs, _ = embedded.parallel_pairs(src, tgt, split)
        return _examples_dataset([signals.format_source(template, s, src, tgt) for s, _ in pairs],
                                 [t for _, t in pairs], (src, tgt), shuffle_files, seed)

    return dataset_fn


def _validate(langs: Sequence[str], pivot: str, temperature: float) -> None:
    embedded.check_langs(langs)
    if len(set(langs)) != len(langs):
        raise ValueError(f"duplicate languages in {tuple(langs)}")
    if len(langs) < 2:
        raise ValueError(f"need at least two languages, got {tuple(langs)}")
    if pivot not in langs:
        raise ValueError(f"pivot {pivot!r} is not in langs {tuple(langs)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _features(vocab_path: str | Path | None, text_format: signals.TextFormat | None,
              ) -> dict[str, seqio.Feature]:
    """The Tasks' output features: the vocabulary at ``vocab_path``, or the format's."""
    if text_format is None:
        inputs = targets = vocab.seqio_vocabulary(vocab_path)
    else:
        inputs, targets = text_format.input_vocab, text_format.target_vocab
    return {k: seqio.Feature(vocabulary=v, add_eos=True, required=True)
            for k, v in (("inputs", inputs), ("targets", targets))}


def _check_vocab(vocab_path: str | Path | None, text_format: signals.TextFormat | None,
                 pairs: Sequence[tuple[str, str]]) -> None:
    """Fails before the registry changes: no vocabulary, or a direction the format
    cannot signal (e.g. a ``{tgt_name}`` without a name)."""
    if text_format is None:
        if vocab_path is None or not os.path.exists(vocab_path):
            raise FileNotFoundError(f"{vocab_path}: no SentencePiece model there")
        return
    if not isinstance(text_format, signals.TextFormat):
        raise TypeError(f"text_format must be a jaxmt.data.signals.TextFormat, got "
                        f"{type(text_format).__name__}")
    for src, tgt in pairs:
        text_format.check_direction(src, tgt)


def register(vocab_path: str | Path | None, langs: Sequence[str], pivot: str = "en",
             temperature: float = 5.0, prefix: str = "jaxmt_bible", *,
             mixture_cap: int = 0, mixture_caps: Mapping[str, int] | None = None,
             mixture_weights: Mapping[str, float] | None = None,
             text_format: signals.TextFormat | None = None) -> str:
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
        mixture_cap, mixture_caps, mixture_weights: The DataConfig fields of the same
            names (caps and explicit weights; see :mod:`jaxmt.data.mixture`).
        text_format: Another model's vocabularies and source signal (an imported base
            model's: :func:`jaxmt.inference.tokenizer.text_format`). Each source is then
            ``format_source(text_format.template, text, src, tgt)`` tokenised by its
            ``input_vocab``, each target tokenised by its ``target_vocab``, and
            ``vocab_path`` is not read. None: ``vocab_path`` and the ``<2xx>`` tag.

    Returns:
        The Mixture's name.
    """
    _validate(langs, pivot, temperature)
    mixlib.resolve(directions(langs, pivot), mixture_cap, mixture_caps, mixture_weights,
                   owner="")  # bad caps or weights fail before the registry changes
    _check_vocab(vocab_path, text_format, directions(langs, pivot))
    template = signals.TAG_TEMPLATE if text_format is None else text_format.template
    mixture = f"{prefix}_mix"
    seqio.MixtureRegistry.remove(mixture)
    for a in embedded.EMBEDDED_LANGS:
        for b in embedded.EMBEDDED_LANGS:
            seqio.TaskRegistry.remove(task_name(prefix, a, b))
            SKIP_REPORTS.pop(task_name(prefix, a, b), None)

    features = _features(vocab_path, text_format)
    train_sizes = {}
    for src, tgt in directions(langs, pivot):
        name = task_name(prefix, src, tgt)
        reports = {split: embedded.parallel_pairs(src, tgt, split)[1] for split in SPLITS}
        SKIP_REPORTS[name] = reports
        train_sizes[name] = reports["train"].kept
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                _dataset_fn(src, tgt, template), splits=SPLITS,
                num_input_examples={s: r.kept for s, r in reports.items()}),
            preprocessors=[
                seqio.preprocessors.tokenize,  # keeps the strings as *_pretokenized
                seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim,
            ],
            output_features=features,
            metric_fns=[],
        )
    rates = _rates(mixture, {d: task_name(prefix, *d) for d in directions(langs, pivot)},
                   train_sizes, temperature, mixture_cap, mixture_caps, mixture_weights)
    seqio.MixtureRegistry.add(mixture, sorted(rates.items()))
    reports = [r for n in train_sizes for r in SKIP_REPORTS[n].values()]
    log.info("registered %s: %d tasks, train pairs %s, rates %s, %d pairs skipped (%s)",
             mixture, len(train_sizes),
             {n.removeprefix(prefix + "_"): k for n, k in train_sizes.items()},
             {n.removeprefix(prefix + "_"): round(r, 4) for n, r in rates.items()},
             sum(sum(r.skipped.values()) for r in reports),
             "; ".join(r.summary() for r in reports if r.kept < r.total) or "none")
    return mixture


# ---------------------------------------------------------------- user corpora

# Task names each register_corpus prefix made last time, so a new call replaces them.
_CORPUS_TASKS: dict[str, list[str]] = {}


def corpus_task_name(prefix: str, src: str, tgt: str) -> str:
    """``f"{prefix}_{src}_{tgt}"`` with ``-`` as ``_`` (seqio names allow no ``-``).

    ``en``, ``pt-BR`` -> ``prefix_en_pt_BR``: unambiguous, since a valid code's
    subtags after the first are never lowercase two-letter words.
    """
    return task_name(prefix, src.replace("-", "_"), tgt.replace("-", "_"))


# String features of every source example: its direction's languages. Not tokenised
# nor cached; the training pipeline passes them through for language-adapter routing.
LANG_FEATURES = ("src_lang", "tgt_lang")


def _examples_dataset(inputs: list[str], targets: list[str], direction: tuple[str, str],
                      shuffle: bool, seed: int | None) -> tf.data.Dataset:
    """In-memory string examples of one direction ``(src, tgt)``, reshuffled every
    epoch, each with the direction as :data:`LANG_FEATURES`."""
    src, tgt = direction
    key = f"{src}-{tgt}"
    ds = tf.data.Dataset.from_tensor_slices({"inputs": tf.constant(inputs, tf.string),
                                             "targets": tf.constant(targets, tf.string)})
    if shuffle:
        # A full shuffle of the strings is cheap here. seqio hands every task of a
        # mixture the same seed; mixing in the direction keeps en->de and en->fr from
        # walking the verses in the same order (which would fill a batch with one verse
        # in several languages).
        if seed is not None:
            seed = (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31
        ds = ds.shuffle(max(1, len(inputs)), seed=seed, reshuffle_each_iteration=True)
    return ds.map(lambda ex: {**ex, **{k: tf.constant(v, tf.string)
                                       for k, v in zip(LANG_FEATURES, direction)}})


def _corpus_dataset_fn(src: str, tgt: str, parts: Mapping[str, list[tuple[list, bool]]],
                       template: str = signals.TAG_TEMPLATE):
    """The FunctionDataSource callback of one direction of user embedded.

    ``parts[split]`` lists ``(pairs, swapped)``: pairs as read from one file, and
    whether this direction reads them target-to-source.
    """

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        inputs, targets = [], []
        for pairs, swapped in parts[split]:
            for a, b in pairs:
                s, t = (b, a) if swapped else (a, b)
                inputs.append(signals.format_source(template, s, src, tgt))
                targets.append(t)
        return _examples_dataset(inputs, targets, (src, tgt), shuffle_files, seed)

    return dataset_fn


def register_corpus(corpus: Sequence[sources.CorpusSource | Mapping],
                    vocab_path: str | Path | None, *, temperature: float = 5.0,
                    prefix: str = "jaxmt_corpus",
                    limits: sources.CleanConfig | Mapping | None = None,
                    report_dir: str | Path | None = None, mixture_cap: int = 0,
                    mixture_caps: Mapping[str, int] | None = None,
                    mixture_weights: Mapping[str, float] | None = None,
                    text_format: signals.TextFormat | None = None, report_label: str = "",
                    by_direction: bool = False) -> str:
    """Registers user parallel corpora as one seqio Task per direction, plus a Mixture.

    Every file is read and checked once, here, by :func:`jaxmt.data.sources.read_pairs`
    (the checks of ``jaxmt data validate``), and its clean pairs are kept in memory:
    a bad record is a counted skip now (or, with ``limits.strict``, an error now),
    never a failure mid-run. A source gives ``src -> tgt`` and, with
    ``both_directions``, ``tgt -> src``; files of the same language pair and split
    are concatenated and deduplicated together. Tasks are named by
    :func:`corpus_task_name`, have the splits their sources name, and the features
    of :func:`register`'s Tasks (source tagged by :func:`embedded.tag_source`). The
    Mixture ``f"{prefix}_mix"`` samples the train splits at :func:`mixture_rates`.

    Skip reports (one per language pair and split, shared by its two directions) go
    to :data:`SKIP_REPORTS`, the log and, with ``report_dir``, to
    ``data_report.json`` / ``.txt`` there. Calling again with the same prefix
    replaces this prefix's previous Tasks.

    Args:
        corpus: :class:`~jaxmt.data.sources.CorpusSource` objects, or dicts of their
            fields (as a gin or JSON config gives them).
        vocab_path: SentencePiece model with a tag piece for every target language.
        temperature: Mixture temperature (1 = proportional to size).
        prefix: Name prefix for the Tasks and the Mixture.
        limits: A :class:`~jaxmt.data.sources.CleanConfig` or a dict of its fields.
        report_dir: Where to write the skip reports (the model directory).
        mixture_cap, mixture_caps, mixture_weights: As in :func:`register`.
        text_format: As in :func:`register`; its template replaces the tag (no tag
            piece is then needed, but every direction must format: a ``{tgt_name}``
            needs a known name) and ``vocab_path`` is not read.
        report_label: Put before every report's name (``"distilled "``).
        by_direction: One report and dedup set per direction and split, not per
            language pair (for sources that each give one direction: distilled files).

    Returns:
        The Mixture's name.

    Raises:
        ValueError: Invalid sources or limits, a target language without a tag in
            the vocabulary (or that ``text_format`` cannot signal), no train pairs at
            all, or (strict) a bad record.
        FileNotFoundError: A missing corpus file or vocabulary.
    """
    corpus = sources.as_sources(corpus)
    if not corpus:
        raise ValueError("register_corpus needs at least one CorpusSource")
    if isinstance(limits, Mapping):
        limits = sources.CleanConfig(**limits)
    limits = limits or sources.CleanConfig()
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    all_directions = list(dict.fromkeys((a, b) for s in corpus
                                        for a, b, _ in distilled.directions_of(s)))
    _check_vocab(vocab_path, text_format, all_directions)
    mixlib.resolve(all_directions, mixture_cap, mixture_caps, mixture_weights,
                   owner="")  # before reading
    template = signals.TAG_TEMPLATE if text_format is None else text_format.template
    if text_format is None:
        processor = vocab.load_processor(vocab_path)
        for tgt in sorted({t for _, t in all_directions}):
            try:
                vocab.tag_id(processor, tgt)
            except ValueError as e:
                raise ValueError(f"{vocab_path}: no target-language tag for {tgt!r} "
                                 f"({e})") from None

    # Read every file once: one report and one dedup set per language pair and split.
    report_of, parts = distilled.read_corpus(corpus, limits, label=report_label,
                                             by_direction=by_direction)
    reports = list({id(r): r for r in report_of.values()}.values())
    if report_dir is not None:
        sources.write_reports(report_dir, reports)
    for r in reports:
        log.info("data %s", r.summary())
    sizes = {d: {split: sum(len(p) for p, _ in ps) for split, ps in by_split.items()}
             for d, by_split in parts.items()}
    train_sizes = {corpus_task_name(prefix, *d): n["train"] for d, n in sizes.items()
                   if n.get("train")}
    if not train_sizes:
        raise ValueError(f"no train pairs in {[s.name for s in corpus]}: every corpus is "
                         "another split, or every line was skipped (see the report)")

    mixture = f"{prefix}_mix"
    rates = _rates(mixture, {d: corpus_task_name(prefix, *d) for d in parts}, train_sizes,
                   temperature, mixture_cap, mixture_caps, mixture_weights)
    seqio.MixtureRegistry.remove(mixture)
    for name in _CORPUS_TASKS.pop(prefix, []):
        seqio.TaskRegistry.remove(name)
        SKIP_REPORTS.pop(name, None)
    features = _features(vocab_path, text_format)
    for (src, tgt), by_split in parts.items():
        name = corpus_task_name(prefix, src, tgt)
        SKIP_REPORTS[name] = {split: report_of[(src, tgt, split)] for split in by_split}
        _CORPUS_TASKS.setdefault(prefix, []).append(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(_corpus_dataset_fn(src, tgt, by_split, template),
                                            splits=tuple(by_split),
                                            num_input_examples=sizes[(src, tgt)]),
            preprocessors=[
                seqio.preprocessors.tokenize,
                seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim,
            ],
            output_features=features,
            metric_fns=[],
        )
    seqio.MixtureRegistry.add(mixture, sorted(rates.items()))
    log.info("registered %s: %d tasks, train pairs %s, rates %s", mixture, len(parts),
             {n.removeprefix(prefix + "_"): k for n, k in train_sizes.items()},
             {n.removeprefix(prefix + "_"): round(r, 4) for n, r in rates.items()})
    return mixture


def register_from_config(data_cfg, vocab_path: str | Path | None,
                         report_dir: str | Path | None = None, *,
                         text_format: signals.TextFormat | None = None) -> str:
    """Registers what a :class:`jaxmt.config.DataConfig` trains on; returns the Mixture.

    Its ``corpora`` through :func:`register_corpus` (skip reports to ``report_dir``),
    else the embedded corpus's ``langs`` through :func:`register`; the mixture
    temperature, caps and weights come from the config. ``text_format``: as in
    :func:`register` (a base model's tokenizer and signal; ``vocab_path`` unused).
    With ``distilled`` set, the Mixture of :func:`register_distilled` over those.
    """
    mix_kw = dict(temperature=data_cfg.temperature, mixture_cap=data_cfg.mixture_cap,
                  mixture_caps=data_cfg.mixture_caps, mixture_weights=data_cfg.mixture_weights,
                  text_format=text_format)
    if data_cfg.corpora:
        mixture = register_corpus(data_cfg.corpora, vocab_path, limits=data_cfg.clean,
                                  report_dir=report_dir, **mix_kw)
    else:
        mixture = register(vocab_path, data_cfg.langs, pivot=data_cfg.pivot, **mix_kw)
    if not data_cfg.distilled:
        return mixture
    return register_distilled(mixture, data_cfg.distilled, vocab_path,
                              rate=data_cfg.distilled_rate, limits=data_cfg.clean,
                              report_dir=report_dir, text_format=text_format)


def register_distilled(reference: str, out_dir: str | Path, vocab_path: str | Path | None, *,
                       rate: float = 1.0, limits: sources.CleanConfig | None = None,
                       report_dir: str | Path | None = None,
                       text_format: signals.TextFormat | None = None) -> str:
    """Sequence-level distillation: the teacher's outputs (``jaxmt distill translate``'s
    directory ``out_dir``) in place of, or beside, the references of Mixture ``reference``.

    Each direction's distilled file becomes a Task ``jaxmt_distilled_<src>_<tgt>``
    (:func:`register_corpus`: the same cleaning, skip reports and features as any
    corpus; an empty teacher output is an ``empty_side`` skip). The Mixture
    ``jaxmt_distilled_mix`` keeps each direction's share of ``reference``: ``rate`` of it
    goes to the distilled Task and ``1 - rate`` to the reference Task (left out at 1).
    Only train is distilled; evaluation reads the references as before.

    Args:
        reference: A Mixture registered by :func:`register` or :func:`register_corpus`.
        out_dir: The distilled corpus (``DataConfig.distilled``).
        vocab_path, text_format: As the reference was registered with.
        rate: ``DataConfig.distilled_rate``, in (0, 1].
        limits: The cleaning limits (``DataConfig.clean``).
        report_dir: Where to write the distilled skip reports
            (``distilled_data_report.json`` / ``.txt``).

    Returns:
        The Mixture's name.

    Raises:
        ValueError: No finished corpus in ``out_dir``, a direction of ``reference`` it
            lacks (all named), or a direction with no usable distilled pair.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"distilled rate must be in (0, 1], got {rate!r}")
    info = MIXTURES[reference]
    ref_mix = seqio.get_mixture_or_task(reference)
    ref_rates = {t.name: ref_mix.get_rate(t) for t in ref_mix.tasks}
    wanted = list(dict.fromkeys(info.directions.values()))
    corpus = distilled.corpus_sources(str(out_dir), wanted)
    # Its own Mixture (temperature rates) is replaced below; only its Tasks are used.
    register_corpus(corpus, vocab_path, prefix=distilled.PREFIX, limits=limits,
                    text_format=text_format, report_label="distilled ", by_direction=True)
    names = {d: corpus_task_name(distilled.PREFIX, *d) for d in wanted}
    reports = [SKIP_REPORTS[names[d]]["train"] for d in wanted]
    if report_dir is not None:
        sources.write_reports(report_dir, reports, stem=distilled.REPORT_STEM)
    empty = [mixlib.direction_key(*d) for d, r in zip(wanted, reports) if not r.kept]
    if empty:
        raise ValueError(f"DataConfig.distilled={out_dir}: no usable distilled pair for "
                         f"{', '.join(empty)} (every line was skipped; see "
                         f"{distilled.REPORT_STEM}.txt or the log)")
    mixture = f"{distilled.PREFIX}_mix"
    rates, task_dirs, counted, explicit = {}, {}, {}, set()
    for task, direction in info.directions.items():
        d_task = names[direction]
        shares = [(d_task, rate, SKIP_REPORTS[d_task]["train"].kept)]
        shares += [(task, 1.0 - rate, info.counted[task])] if rate < 1.0 else []
        for name, share, n in shares:
            rates[name], task_dirs[name] = ref_rates[task] * share, direction
            counted[name] = min(n, info.counted[task])  # a capped reference: its cap
            if task in info.explicit:
                explicit.add(name)
    seqio.MixtureRegistry.remove(mixture)
    seqio.MixtureRegistry.add(mixture, sorted(rates.items()))
    MIXTURES[mixture] = MixtureInfo(directions=task_dirs, counted=counted,
                                    explicit=frozenset(explicit),
                                    temperature=info.temperature)
    log.info("registered %s: distilled share %g of every direction of %s, rates %s",
             mixture, rate, reference, {n: round(r, 4) for n, r in rates.items()})
    return mixture


# ---------------------------------------------------------------- the rate table

def mixture_stats(mixture: str, vocab_path: str | Path | signals.TextFormat,
                  token_sample: int = 0) -> list[dict]:
    """Per direction of a registered Mixture: sizes, rate and SentencePiece tokens.

    The input to :func:`jaxmt.data.mixture.rate_table`. Tokens are those the model
    is fed: the tagged source and the target, each with its EOS, before trimming to
    ``src_len``/``tgt_len``.

    Args:
        mixture: A Mixture made by :func:`register` or :func:`register_corpus`.
        vocab_path: Its SentencePiece model, or the TextFormat it was registered with.
        token_sample: Tokenise only every k-th train pair, k = ceil(pairs /
            token_sample), and scale the counts up (0: tokenise every pair).

    Returns:
        One dict per Task, in the Mixture's order: ``src``, ``tgt``, ``task``,
        ``examples``, ``counted``, ``explicit``, ``rate``, ``src_tokens``,
        ``tgt_tokens``, ``tokens_sampled`` (pairs actually tokenised). A Mixture with
        distilled Tasks (:func:`register_distilled`) adds ``direction``, e.g. ``"en-de
        distilled"`` and ``"en-de reference"``, the rate table's row names.
    """
    if mixture not in MIXTURES:
        raise KeyError(f"{mixture!r} was not registered by jaxmt.data.tasks in this process")
    info = MIXTURES[mixture]
    mix = seqio.get_mixture_or_task(mixture)
    if isinstance(vocab_path, signals.TextFormat):
        fmt = vocab_path

        def count(texts, v):
            return sum(len(v.encode(x.decode())) for x in texts)

        count_src = functools.partial(count, v=fmt.input_vocab)
        count_tgt = functools.partial(count, v=fmt.target_vocab)
    else:
        sp = vocab.load_processor(vocab_path)

        def count_src(texts):
            return sum(map(len, sp.encode([x.decode() for x in texts])))

        count_tgt = count_src
    out = []
    for task_name_, (src, tgt) in info.directions.items():
        task = seqio.get_mixture_or_task(task_name_)
        n = task.num_input_examples("train")
        ds = task.source.get_dataset(split="train", shuffle=False)
        stride = max(1, -(-n // token_sample)) if token_sample else 1
        if stride > 1:
            ds = ds.shard(stride, 0)
        src_tok = tgt_tok = seen = 0
        for batch in ds.batch(8192).as_numpy_iterator():
            src_tok += count_src(batch["inputs"])
            tgt_tok += count_tgt(batch["targets"])
            seen += len(batch["inputs"])
        scale = n / seen if seen else 0.0
        label = {}
        if any(t.startswith(distilled.PREFIX + "_") for t in info.directions):
            kind = "distilled" if task_name_.startswith(distilled.PREFIX + "_") else "reference"
            label = {"direction": f"{mixlib.direction_key(src, tgt)} {kind}"}
        out.append({**label, "src": src, "tgt": tgt, "task": task_name_, "examples": n,
                    "counted": info.counted[task_name_],
                    "explicit": task_name_ in info.explicit, "rate": mix.get_rate(task),
                    "src_tokens": round((src_tok + seen) * scale),  # + EOS per example
                    "tgt_tokens": round((tgt_tok + seen) * scale), "tokens_sampled": seen})
    return out
