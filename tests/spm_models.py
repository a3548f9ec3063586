"""Small SentencePiece models trained in memory, for the tests that need a tokenizer file
shaped like a real checkpoint's (T5's spiece.model, Marian's source/target.spm)."""

import io

import sentencepiece as spm


def train_spm(lines: list[str], vocab_size: int, **ids) -> bytes:
    """A unigram model of ``lines`` (``ids``: pad_id, eos_id, ... as the checkpoint has
    them), as the bytes of a ``.model`` file."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2, **ids)
    return model.getvalue()
