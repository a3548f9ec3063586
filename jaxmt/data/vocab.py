"""The shared SentencePiece vocabulary: training, loading, and its seqio wrapper.

Only sentencepiece at import time: the translator loads vocabularies without
TensorFlow. seqio is imported inside :func:`seqio_vocabulary` alone.

Ids follow the T5/seqio convention (pad 0, EOS 1, UNK 2, no BOS). Every
target-language tag of :data:`~jaxmt.data.embedded.EMBEDDED_LANGS`, and of every
other language the model is trained on (any code :func:`~jaxmt.data.sources.check_lang_code`
accepts, e.g. ``pt-BR``), is a user-defined piece, so a tag is always exactly one id
(see :func:`tag_langs`). The pieces are ``"▁<2xx>"`` (with the word-boundary mark), not
``"<2xx>"``: SentencePiece prepends a boundary mark to every input, so a bare
``"<2xx>"`` piece would encode ``"<2de> text"`` as ``["▁", "<2de>", ...]`` and the
tag would not be the first id. Use :func:`tag_id` rather than ``piece_to_id``.

The text a vocabulary is trained on is a language-balanced sample: of the embedded
corpus (:func:`sample_sentences`) or of the user's corpora, read through
:func:`jaxmt.data.sources.read_pairs` with the checks training applies
(:func:`sample_corpus_sentences`). :func:`report` measures a trained vocabulary on
held-out text (``jaxmt vocab report``): unknown rate, fertility, round-trip exactness.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import random
import statistics
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import sentencepiece as spm

from jaxmt.data import embedded, sources
from jaxmt.fileio import write_atomic

if TYPE_CHECKING:
    import seqio

log = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_BOUNDARY = "\u2581"  # SentencePiece's word-boundary mark
FERTILITY_WARN_RATIO = 2.0  # report(): warn above this multiple of the median fertility


def tag_piece(lang: str) -> str:
    """The vocabulary piece of a target-language tag, e.g. ``"▁<2de>"``."""
    return _BOUNDARY + embedded.lang_tag(lang)


def tag_langs(langs: Iterable[str]) -> list[str]:
    """The languages whose tags a vocabulary trained on ``langs`` holds, in id order.

    :data:`~jaxmt.data.embedded.EMBEDDED_LANGS` first, in their order (so a vocabulary
    of embedded languages is the same as before corpora existed), then the other
    languages of ``langs``, sorted.
    """
    extra = sorted(set(langs) - set(embedded.EMBEDDED_LANGS))
    return [*embedded.EMBEDDED_LANGS, *extra]


def tag_id(processor: spm.SentencePieceProcessor, lang: str) -> int:
    """Id of the target-language tag ``lang`` in ``processor``.

    Raises:
        ValueError: The vocabulary has no such piece (it was not built by
            :func:`train_vocab`).
    """
    piece = tag_piece(lang)
    i = processor.piece_to_id(piece)
    if i == processor.unk_id() or processor.id_to_piece(i) != piece:
        raise ValueError(f"vocabulary has no tag piece {piece!r}")
    return i


def sample_sentences(langs: Sequence[str], sample_per_lang: int, seed: int = 0) -> list[str]:
    """A language-balanced, deterministic sample of the train split.

    Each language contributes the same number of non-empty verses (``sample_per_lang``,
    or fewer if a language has fewer), drawn with its own ``random.Random`` seeded by
    ``(seed, lang)`` so one language's sample does not depend on the others chosen.
    Languages are interleaved verse by verse.
    """
    if sample_per_lang <= 0:
        raise ValueError(f"sample_per_lang must be positive, got {sample_per_lang}")
    _, texts = embedded.load_split("train", langs)
    pools = {lang: [t for t in texts[lang] if t] for lang in langs}
    k = min(sample_per_lang, *(len(p) for p in pools.values()))
    samples = [random.Random(f"{seed}:{lang}").sample(pools[lang], k) for lang in langs]
    return [s for group in zip(*samples) for s in group]


def sample_corpus_sentences(corpus: Sequence[sources.CorpusSource | Mapping],
                            langs: Sequence[str], sample_per_lang: int, seed: int = 0,
                            limits: sources.CleanConfig | Mapping | None = None) -> list[str]:
    """A language-balanced, deterministic sample of the user's train-split embedded.

    Both sides of every clean pair of every ``split == "train"`` source are read
    through :func:`jaxmt.data.sources.read_pairs` with ``limits`` (the checks and the
    pair deduplication of training, so a line training skips is never sampled) and
    belong to the source's ``src_lang`` and ``tgt_lang``. A sentence repeated within a
    language (e.g. the English side of en-de and en-fr files) counts once.

    Each language contributes ``sample_per_lang`` sentences, or all it has when fewer
    (a warning is logged then: that language is under-represented), drawn by
    reservoir sampling with its own ``random.Random`` seeded by ``(seed, lang)``.
    Reading streams: memory is the samples plus 8 bytes a distinct sentence.
    Languages are interleaved sentence by sentence, in the order of ``langs``.

    Raises:
        ValueError: No train-split source, a language of ``langs`` with no sentence,
            an invalid source or limits; or, with ``limits.strict``, a bad line.
        FileNotFoundError: A corpus file is missing.
    """
    if sample_per_lang <= 0:
        raise ValueError(f"sample_per_lang must be positive, got {sample_per_lang}")
    corpus = sources.as_sources(corpus)
    if isinstance(limits, Mapping):
        limits = sources.CleanConfig(**limits)
    langs = tuple(dict.fromkeys(sources.check_lang_code(lang) for lang in langs))
    train = [s for s in corpus if s.split == "train"]
    if not train:
        raise ValueError(f"no train-split source among {[s.name for s in corpus]}: the "
                         "vocabulary is sampled from train text only")
    samples: dict[str, list[str]] = {lang: [] for lang in langs}
    counts = dict.fromkeys(langs, 0)
    distinct: dict[str, set[bytes]] = {lang: set() for lang in langs}
    rngs = {lang: random.Random(f"{seed}:{lang}") for lang in langs}
    pair_seen: dict[tuple[str, str], set[bytes]] = {}  # as register_corpus dedups pairs
    for source in train:
        if source.src_lang not in samples and source.tgt_lang not in samples:
            continue
        seen = pair_seen.setdefault(tuple(sorted((source.src_lang, source.tgt_lang))), set())
        for pair in sources.read_pairs(source, limits, seen=seen):
            for lang, text in zip((source.src_lang, source.tgt_lang), pair):
                if lang not in samples:
                    continue
                key = hashlib.blake2b(text.encode(), digest_size=8).digest()
                if key in distinct[lang]:
                    continue
                distinct[lang].add(key)
                n = counts[lang]
                counts[lang] += 1
                if n < sample_per_lang:  # reservoir sampling (Algorithm R)
                    samples[lang].append(text)
                else:
                    j = rngs[lang].randrange(n + 1)
                    if j < sample_per_lang:
                        samples[lang][j] = text
    missing = [lang for lang in langs if not counts[lang]]
    if missing:
        have = sorted({x for s in train for x in (s.src_lang, s.tgt_lang)})
        raise ValueError(f"no train text for {missing} in the corpus (its train "
                         f"languages: {have})")
    short = {lang: n for lang, n in counts.items() if n < sample_per_lang}
    if short:
        log.warning("vocabulary sample: %s have fewer than sample_per_lang=%d distinct "
                    "train sentences and are sampled whole", short, sample_per_lang)
    groups = itertools.zip_longest(*(samples[lang] for lang in langs))
    return [s for group in groups for s in group if s is not None]


def train_vocab(out_path: str | Path, langs: Sequence[str], vocab_size: int,
                sample_per_lang: int, seed: int = 0,
                corpus: Sequence[sources.CorpusSource | Mapping] = (),
                limits: sources.CleanConfig | Mapping | None = None,
                character_coverage: float = 0.9995) -> Path:
    """Trains one shared unigram SentencePiece model and writes it to ``out_path``.

    Args:
        out_path: The ``.model`` file to write (atomically: a crash leaves no partial file).
        langs: Languages whose train-split text is sampled. Their tags, and those of
            every embedded language, are one piece each (:func:`tag_langs`).
        vocab_size: Number of pieces, including pad/EOS/UNK, the tags and 256 byte pieces.
        sample_per_lang: Sentences per language (see :func:`sample_sentences` and
            :func:`sample_corpus_sentences`).
        seed: Sampling seed; training itself has no randomness left.
        corpus: The user's corpora (``DataConfig.corpora``); when given, the sample is
            drawn from their train-split files instead of the embedded corpus.
        limits: The corpora's checks (``DataConfig.clean``); default ``CleanConfig()``.
        character_coverage: Share of the sample's characters that get their own
            pieces; the rarest rest are spelled with byte pieces (byte fallback), so
            nothing is ever UNK. 0.9995 suits alphabetic scripts; for large character
            sets (Chinese, Japanese) some use lower values.

    Returns:
        ``out_path`` as a Path.
    """
    out_path = Path(out_path)
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    langs = tuple(dict.fromkeys(langs))
    symbols = [tag_piece(lang) for lang in tag_langs(langs)]  # also checks the codes
    if corpus:
        sentences = sample_corpus_sentences(corpus, langs, sample_per_lang, seed, limits)
    else:
        sentences = sample_sentences(langs, sample_per_lang, seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,  # unseen characters become byte pieces, never UNK
        normalization_rule_name="nmt_nfkc",
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        user_defined_symbols=symbols,
        # Use every sentence, in the given order: no sampling, so runs are reproducible.
        input_sentence_size=len(sentences),
        shuffle_input_sentence=False,
        num_threads=min(4, os.cpu_count() or 1),
        minloglevel=1,
    )
    write_atomic(out_path, model.getvalue())
    return out_path



def train_for_config(out_path: str | Path, data_cfg, seed: int) -> Path:
    """The vocabulary ``jaxmt train`` trains for a :class:`jaxmt.config.DataConfig`."""
    return train_vocab(out_path, data_cfg.corpus_langs, data_cfg.vocab_size,
                       data_cfg.vocab_sample_per_lang, seed=seed, corpus=data_cfg.corpora,
                       limits=data_cfg.clean)

def load_processor(path: str | Path) -> spm.SentencePieceProcessor:
    """Loads a model written by :func:`train_vocab`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no SentencePiece model there")
    return spm.SentencePieceProcessor(model_file=str(path))


def seqio_vocabulary(path: str | Path) -> "seqio.SentencePieceVocabulary":
    """The same model as a ``seqio.SentencePieceVocabulary`` (no extra ids)."""
    import seqio  # lazily: importing seqio loads TensorFlow

    return seqio.SentencePieceVocabulary(str(path), extra_ids=0)


# ---------------------------------------------------------------- report

def _round_trip_reference(processor: spm.SentencePieceProcessor, text: str) -> str:
    """What an exact round trip gives back: ``text`` after the model's normalisation.

    ``normalize`` (sentencepiece >= 0.2) returns the normalised text as the encoder
    sees it: NFKC, runs of whitespace as one ``"▁"``, and a leading ``"▁"`` (the dummy
    prefix); ``decode`` turns every ``"▁"`` back into a space and drops the leading one.
    """
    normalize = getattr(processor, "normalize", None)
    if normalize is None:  # sentencepiece < 0.2: NFKC and folded whitespace, nearly the same
        return " ".join(unicodedata.normalize("NFKC", text).split())
    return normalize(text).replace(_BOUNDARY, " ").removeprefix(" ")


def report(model_path: str | Path, texts_by_lang: Mapping[str, Sequence[str]],
           fertility_warn_ratio: float = FERTILITY_WARN_RATIO) -> dict[str, Any]:
    """Per-language statistics of a vocabulary on some text (``jaxmt vocab report``).

    For each language (empty or whitespace-only texts are left out):

    * ``sentences``, ``words`` (whitespace-separated), ``pieces`` (ids, no EOS);
    * ``fertility``: pieces per word. Words are split at whitespace, so for scripts
      written without spaces (Chinese, Japanese, Thai) a "word" is a whole phrase and
      fertility is not comparable with other languages;
    * ``unk_rate``: UNK pieces / pieces; with byte fallback it must be 0;
    * ``byte_rate``: byte-fallback pieces / pieces (characters the vocabulary spells
      byte by byte: rare, or from a script it was not trained on);
    * ``round_trip``: share of sentences with ``decode(encode(s))`` equal to ``s``
      after the model's normalisation (NFKC, whitespace runs folded; see
      :func:`_round_trip_reference`): 1.0 unless something is lost;
    * ``round_trip_raw``: the same against ``s`` itself: below 1.0 only where
      normalisation changes the text (e.g. ``"ﬁ"`` -> ``"fi"``, double spaces);
    * ``tag_id``: the language's one-piece target tag, or None without one.

    ``warnings`` lists, one line each: a language whose fertility is more than
    ``fertility_warn_ratio`` times the median over the languages (its text costs
    that much more sequence length and model capacity), any UNK, a round trip below
    1.0, and a language without a tag piece.

    Returns:
        ``{"model", "vocab_size", "median_fertility", "langs": {lang: stats},
        "warnings": [...]}``, JSON-serialisable, languages in the given order.
    """
    sp = load_processor(model_path)
    unk = sp.unk_id()
    stats: dict[str, dict[str, Any]] = {}
    for lang, texts in texts_by_lang.items():
        n = words = pieces = unks = byte_pieces = exact = exact_raw = 0
        for text in texts:
            if not text.strip():
                continue
            ids = sp.encode(text)
            decoded = sp.decode(ids)
            n += 1
            words += len(text.split())
            pieces += len(ids)
            unks += sum(i == unk for i in ids)
            byte_pieces += sum(sp.is_byte(i) for i in ids)
            exact += decoded == _round_trip_reference(sp, text)
            exact_raw += decoded == text
        try:
            tag = tag_id(sp, lang)
        except ValueError:
            tag = None
        stats[lang] = {
            "sentences": n, "words": words, "pieces": pieces,
            "fertility": pieces / words if words else 0.0,
            "unk_rate": unks / pieces if pieces else 0.0,
            "byte_rate": byte_pieces / pieces if pieces else 0.0,
            "round_trip": exact / n if n else 1.0,
            "round_trip_raw": exact_raw / n if n else 1.0,
            "tag_id": tag,
        }
    measured = [s["fertility"] for s in stats.values() if s["words"]]
    median = statistics.median(measured) if measured else 0.0
    warnings = []
    for lang, s in stats.items():
        if not s["sentences"]:
            warnings.append(f"{lang}: no text to measure")
            continue
        if median and s["fertility"] > fertility_warn_ratio * median:
            warnings.append(f"{lang}: fertility {s['fertility']:.2f} pieces/word is "
                            f"{s['fertility'] / median:.1f}x the median {median:.2f} "
                            f"(> {fertility_warn_ratio:g}x): the vocabulary serves this "
                            "language poorly; "
                            + (f"{s['byte_rate']:.0%} of its pieces are bytes: was it "
                               "trained on this script?" if s["byte_rate"] > 0.5 else
                               "sample more of it or raise vocab_size"))
        if s["unk_rate"] > 0:
            warnings.append(f"{lang}: unk_rate {s['unk_rate']:.4%} > 0: this vocabulary "
                            "has no byte fallback or lost pieces")
        if s["round_trip"] < 1:
            warnings.append(f"{lang}: round trip exact for {s['round_trip']:.2%} of "
                            "sentences only (after normalisation)")
        if s["tag_id"] is None:
            code_error = sources.lang_code_error(lang)
            warnings.append(f"{lang}: {code_error}" if code_error else
                            f"{lang}: no one-piece target tag {tag_piece(lang)!r}; the "
                            "vocabulary cannot train or translate into it")
    return {"model": str(model_path), "vocab_size": sp.get_piece_size(),
            "median_fertility": median, "langs": stats, "warnings": warnings}


def format_report(result: Mapping[str, Any]) -> str:
    """:func:`report`'s result as a table, then its warnings."""
    lines = [f"vocabulary {result['model']}: {result['vocab_size']} pieces, median "
             f"fertility {result['median_fertility']:.2f} pieces/word",
             f"{'lang':<10}{'sentences':>10}{'words':>10}{'pieces':>10}{'fertility':>10}"
             f"{'unk_rate':>10}{'byte_rate':>10}{'round_trip':>11}{'raw_exact':>10}"
             f"{'tag_id':>7}"]
    for lang, s in result["langs"].items():
        tag = "-" if s["tag_id"] is None else str(s["tag_id"])
        lines.append(f"{lang:<10}{s['sentences']:>10}{s['words']:>10}{s['pieces']:>10}"
                     f"{s['fertility']:>10.2f}{s['unk_rate']:>10.4f}{s['byte_rate']:>10.4f}"
                     f"{s['round_trip']:>11.4f}{s['round_trip_raw']:>10.4f}{tag:>7}")
    lines += [f"warning: {w}" for w in result["warnings"]] or ["no warnings"]
    return "\n".join(lines)
