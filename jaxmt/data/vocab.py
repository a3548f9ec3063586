"""The shared SentencePiece vocabulary: training, loading, and its seqio wrapper.

Only sentencepiece at import time: the translator loads vocabularies without
TensorFlow. seqio is imported inside :func:`seqio_vocabulary` alone.

Ids follow the T5/seqio convention (pad 0, EOS 1, UNK 2, no BOS). Every
target-language tag of :data:`~jaxmt.data.corpora.EMBEDDED_LANGS` is a
user-defined piece, so a tag is always exactly one id, whichever languages a
model trains on. The pieces are ``"▁<2xx>"`` (with the word-boundary mark), not
``"<2xx>"``: SentencePiece prepends a boundary mark to every input, so a bare
``"<2xx>"`` piece would encode ``"<2de> text"`` as ``["▁", "<2de>", ...]`` and the
tag would not be the first id. Use :func:`tag_id` rather than ``piece_to_id``.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import sentencepiece as spm

from jaxmt.data import corpora

if TYPE_CHECKING:
    import seqio

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_BOUNDARY = "\u2581"  # SentencePiece's word-boundary mark


def tag_piece(lang: str) -> str:
    """The vocabulary piece of a target-language tag, e.g. ``"▁<2de>"``."""
    return _BOUNDARY + corpora.lang_tag(lang)


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
    _, texts = corpora.load_split("train", langs)
    pools = {lang: [t for t in texts[lang] if t] for lang in langs}
    k = min(sample_per_lang, *(len(p) for p in pools.values()))
    samples = [random.Random(f"{seed}:{lang}").sample(pools[lang], k) for lang in langs]
    return [s for group in zip(*samples) for s in group]


def train_vocab(out_path: str | Path, langs: Sequence[str], vocab_size: int,
                sample_per_lang: int, seed: int = 0) -> Path:
    """Trains one shared unigram SentencePiece model and writes it to ``out_path``.

    Args:
        out_path: The ``.model`` file to write (atomically: a crash leaves no partial file).
        langs: Languages whose train-split text is sampled.
        vocab_size: Number of pieces, including pad/EOS/UNK, the tags and 256 byte pieces.
        sample_per_lang: Sentences per language (see :func:`sample_sentences`).
        seed: Sampling seed; training itself has no randomness left.

    Returns:
        ``out_path`` as a Path.
    """
    out_path = Path(out_path)
    sentences = sample_sentences(langs, sample_per_lang, seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,  # unseen characters become byte pieces, never UNK
        normalization_rule_name="nmt_nfkc",
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        user_defined_symbols=[tag_piece(lang) for lang in corpora.EMBEDDED_LANGS],
        # Use every sentence, in the given order: no sampling, so runs are reproducible.
        input_sentence_size=len(sentences),
        shuffle_input_sentence=False,
        num_threads=min(4, os.cpu_count() or 1),
        minloglevel=1,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise
    return out_path


def load_processor(path: str | Path) -> spm.SentencePieceProcessor:
    """Loads a model written by :func:`train_vocab`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no SentencePiece model there")
    return spm.SentencePieceProcessor(model_file=str(path))


def seqio_vocabulary(path: str | Path) -> "seqio.SentencePieceVocabulary":
    """The same model as a ``seqio.SentencePieceVocabulary`` (no extra ids)."""
    import seqio  # lazily: importing seqio loads TensorFlow

    return seqio.SentencePieceVocabulary(str(path), extra_ids=0)
