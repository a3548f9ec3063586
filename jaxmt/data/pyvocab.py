"""A seqio Vocabulary over Python encode/decode callables (imported tokenizers in training).

The seqio Tasks tokenise inside tf.data; a tokenizer with no TensorFlow op (an
imported MarianMT model's: two SentencePiece models, ``vocab.json`` and an id
reordering, :class:`jaxmt.inference.tokenizer.MarianTokenizer`) runs there through
``tf.numpy_function``, so training reads exactly the ids inference gives for the same
text. Built by :func:`jaxmt.inference.tokenizer.text_format`; this module takes the
callables, since the data layer imports nothing from inference.

The Python calls hold the GIL: tokenising this way is slower than seqio's
SentencePiece op, which is what the pre-tokenised cache (``jaxmt data cache``) is for.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import seqio  # noqa: E402

from jaxmt.data.tfdata import tf  # noqa: E402  (hidden from accelerators there)
from jaxmt.data.vocab import EOS_ID, UNK_ID  # noqa: E402


class FunctionVocabulary(seqio.Vocabulary):
    """A ``seqio.Vocabulary`` whose ids come from Python callables.

    Args:
        encode_fn: ``text -> ids`` without EOS.
        decode_fn: ``ids -> text``; seqio has already cut the ids after the first EOS
            (and, in ``decode_tf``, padded what followed it).
        size: Number of ids (the model's vocabulary size); pad is 0.
        eos_id, unk_id: jaxmt's convention by default (1 and 2).
        key: Identifies the tokenizer (e.g. its files' digest): vocabularies are equal
            when their keys and sizes are.
    """

    def __init__(self, encode_fn: Callable[[str], Sequence[int]],
                 decode_fn: Callable[[Sequence[int]], str], size: int, *,
                 eos_id: int = EOS_ID, unk_id: int | None = UNK_ID, key: str = ""):
        if size <= max(eos_id, unk_id or 0):
            raise ValueError(f"vocabulary size {size} must exceed eos_id={eos_id} and "
                             f"unk_id={unk_id}")
        self._encode_fn, self._decode_fn = encode_fn, decode_fn
        self._size, self._eos_id, self._unk_id, self.key = size, eos_id, unk_id, key
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self._size

    def _encode(self, s: str) -> list[int]:
        return [int(i) for i in self._encode_fn(s)]

    def _decode(self, ids) -> str:
        return self._decode_fn([int(i) for i in ids])

    def _encode_np(self, s) -> np.ndarray:
        s = s.item() if isinstance(s, np.ndarray) else s  # numpy_function passes a 0-d array
        return np.asarray(self._encode(s.decode("utf-8") if isinstance(s, bytes) else s),
                          np.int32).reshape(-1)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """A scalar string -> int32 ``[n]``; a batch of strings -> a ragged ``[..., None]``."""
        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank is None:
            raise ValueError("FunctionVocabulary.encode_tf needs a string tensor of known rank")
        if s.shape.rank == 0:
            ids = tf.numpy_function(self._encode_np, [s], tf.int32, stateful=False)
            ids.set_shape([None])
            return ids
        flat = tf.reshape(s, [-1])
        ragged = tf.map_fn(self._encode_tf, flat,
                           fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
        for n in reversed(s.shape[1:]):  # back to the batch's own leading dimensions
            ragged = tf.RaggedTensor.from_uniform_row_length(ragged, n)
        return ragged

    def _decode_np(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
        out = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            out[i] = self._decode(row.tolist()).encode("utf-8")
        return out.reshape(ids.shape[:-1])

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int ids ``[..., n]`` -> strings ``[...]``."""
        ids = tf.convert_to_tensor(ids)
        text = tf.numpy_function(self._decode_np, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    def __eq__(self, other) -> bool:
        if other is self:
            return True
        return (isinstance(other, FunctionVocabulary) and self.key != ""
                and self.key == other.key and self._size == other._size)

    def __hash__(self) -> int:
        return hash((FunctionVocabulary, self.key, self._size))

    def __repr__(self) -> str:
        return f"FunctionVocabulary(size={self._size}, key={self.key[:12]!r})"
