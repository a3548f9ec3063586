"""Token-level knowledge distillation: the teacher directory and the two vocabularies.

The loss itself is :func:`jaxmt.modeling.model.distill_kl` (beside the cross entropy) and
the teacher runs frozen inside :class:`jaxmt.train.trainer.Trainer`'s step; this module
holds what is decided before that: whether a teacher directory can teach
(:func:`teacher_configs`), with which settings it runs (:func:`teacher_model_config`), how
its output ids line up with the student's (:func:`vocab_alignment`), and its parameters
(:func:`load_teacher_params`). Everything but the last imports no JAX, so a bad teacher
or vocabulary is refused before devices are touched.

Vocabularies are compared as the decoders see them: the piece string of each output id
(``spm.model`` for a jaxmt-trained directory; a ``jaxmt convert`` directory's tokenizer
files, reordered as its importer reordered the ids). Ids at or above the piece count
(``ModelConfig.vocab_size`` padding rows, T5's sentinels) are not pieces and never count.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import numpy as np

from jaxmt import config as cfglib
from jaxmt.config import ModelConfig
from jaxmt.inference.tokenizer import BASE_FILE, id_permutation  # no JAX

PyTree = Any
FIELD = "DistillConfig.teacher"


class Vocab(NamedTuple):
    """The pieces a model's output ids stand for: ``pieces[i]`` is id i's string, None
    where id i has no piece of the file (reordering gaps)."""

    path: str  # the file(s) they come from, for messages
    pieces: tuple[str | None, ...]


def _spm_pieces(path: str) -> tuple[str, ...]:
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no SentencePiece model there")
    sp = spm.SentencePieceProcessor(model_file=path)
    return tuple(sp.id_to_piece(i) for i in range(sp.get_piece_size()))


def model_vocab(path: str) -> Vocab:
    """The output vocabulary of a model directory (jaxmt-trained: its ``spm.model``; a
    ``jaxmt convert`` output: its tokenizer files, in jaxmt's id order), or of a
    SentencePiece model file.

    Raises:
      FileNotFoundError / ValueError: no vocabulary there (the message names the path).
    """
    if not os.path.isdir(path):
        return Vocab(path, _spm_pieces(path))
    cfgs = cfglib.load(path) if os.path.exists(os.path.join(path, cfglib.CONFIG_FILE)) else {}
    tok = cfgs.get("tokenizer")
    if tok is None:
        spm_path = os.path.join(path, cfglib.VOCAB_FILE)
        return Vocab(spm_path, _spm_pieces(spm_path))
    files = [os.path.join(path, f) for f in tok.vocab_files]
    size = cfgs["model"].vocab_size
    if tok.kind == "t5":
        original: list[str | None] = list(_spm_pieces(files[0]))
    else:  # marian: vocab.json numbers the pieces
        with open(files[2], encoding="utf-8") as f:
            numbered = json.load(f)
        original = [None] * max(size, max(numbered.values(), default=-1) + 1)
        for piece, i in numbered.items():
            original[i] = piece
    perm = id_permutation(size, tok.reordered_ids) if tok.reordered_ids else np.arange(size)
    pieces = [original[o] if o < len(original) else None for o in perm]
    while pieces and pieces[-1] is None:
        pieces.pop()
    return Vocab(" + ".join(files) if tok.kind == "marian" else files[0], tuple(pieces))


@dataclasses.dataclass(frozen=True)
class Alignment:
    """How teacher and student output ids line up.

    Attributes:
      teacher_path, student_path: the vocabulary files compared.
      num_student, num_teacher: their piece counts.
      identical: the teacher's first ``num_student`` pieces are the student's, id for id:
        distillation runs over ids ``< num_student`` on both sides.
      student_ids, teacher_ids: otherwise (``vocab_mapping``), the ids of the pieces both
        have (same string), in the student's id order; distillation runs over those.
    """

    teacher_path: str
    student_path: str
    num_student: int
    num_teacher: int
    identical: bool
    student_ids: np.ndarray | None = None
    teacher_ids: np.ndarray | None = None

    @property
    def shared(self) -> int:
        return self.num_student if self.identical else len(self.student_ids)

    @property
    def kd_ids(self) -> int | tuple[np.ndarray, np.ndarray]:
        """What :func:`jaxmt.modeling.model.distill_kl` takes as ``ids``."""
        return self.num_student if self.identical else (self.student_ids, self.teacher_ids)

    def target_coverage(self, student_vocab_size: int) -> np.ndarray:
        """[student_vocab_size] bools: the student ids a distilled target can have."""
        table = np.zeros(student_vocab_size, bool)
        table[np.arange(self.num_student) if self.identical else self.student_ids] = True
        return table

    def summary(self) -> str:
        if self.identical:
            extra = (f" (the teacher's {self.num_teacher - self.num_student} further pieces "
                     "are left out)" if self.num_teacher > self.num_student else "")
            return f"identical, {self.num_student} pieces{extra}"
        return (f"mapped over {self.shared} shared pieces: {100 * self.shared / self.num_student:.1f}%"
                f" of the student's {self.num_student}, "
                f"{100 * self.shared / self.num_teacher:.1f}% of the teacher's {self.num_teacher}")


def vocab_alignment(teacher: str | Vocab, student: str | Vocab, mapping: bool = False
                    ) -> Alignment:
    """Checks that the teacher's output vocabulary is the student's, piece for piece over
    the student's ids; with ``mapping``, pairs up the pieces they share instead.

    Args:
      teacher, student: model directories or SentencePiece files (:func:`model_vocab`),
        or their :class:`Vocab`.
      mapping: ``DistillConfig.vocab_mapping``.

    Raises:
      ValueError: the vocabularies differ and ``mapping`` is off (naming both files, the
        first differing id and its pieces, and the remedies), or they share no piece.
    """
    t = teacher if isinstance(teacher, Vocab) else model_vocab(teacher)
    s = student if isinstance(student, Vocab) else model_vocab(student)
    n_s, n_t = len(s.pieces), len(t.pieces)
    first = next((i for i in range(n_s) if i >= n_t or t.pieces[i] != s.pieces[i]), None)
    if first is None:
        return Alignment(t.path, s.path, n_s, n_t, identical=True)
    if not mapping:
        theirs = f"{t.pieces[first]!r}" if first < n_t else f"none (it has {n_t} pieces)"
        raise ValueError(
            f"{FIELD}: the teacher's vocabulary {t.path} differs from the student's {s.path} "
            f"at id {first}: teacher {theirs}, student {s.pieces[first]!r} ({n_t} and {n_s} "
            f"pieces). Train the student on the teacher's vocabulary (copy its spm.model into "
            f"the student's --model_dir before the first run) or set "
            f"DistillConfig.vocab_mapping=True to distil over the pieces they share")
    where = {p: i for i, p in enumerate(t.pieces) if p is not None}
    pairs = [(i, where[p]) for i, p in enumerate(s.pieces) if p is not None and p in where]
    if not pairs:
        raise ValueError(f"{FIELD}: the teacher's vocabulary {t.path} and the student's "
                         f"{s.path} share no piece: nothing to distil")
    ids = np.asarray(pairs, np.int32)
    return Alignment(t.path, s.path, n_s, n_t, identical=False, student_ids=ids[:, 0],
                     teacher_ids=ids[:, 1])


# ------------------------------------------------------------------ the teacher directory

def teacher_configs(teacher_dir: str) -> dict:
    """The teacher directory's configs (:func:`jaxmt.config.load`), once it is known to be
    one that can teach: a jaxmt model directory or a ``jaxmt convert`` output, with a
    checkpoint holding every parameter.

    Raises:
      FileNotFoundError / ValueError: it cannot (naming ``DistillConfig.teacher``, the
        directory and the remedy).
    """
    if not os.path.isdir(teacher_dir):
        raise FileNotFoundError(f"{FIELD}={teacher_dir}: no such directory")
    if not os.path.exists(os.path.join(teacher_dir, cfglib.CONFIG_FILE)):
        hf = os.path.exists(os.path.join(teacher_dir, "config.json"))
        raise ValueError(f"{FIELD}={teacher_dir}: " + (
            "a Hugging Face checkpoint; convert it first (`jaxmt convert`) and name the output"
            if hf else f"not a jaxmt model directory (no {cfglib.CONFIG_FILE})"))
    base_file = os.path.join(teacher_dir, BASE_FILE)
    if os.path.exists(base_file):
        with open(base_file, encoding="utf-8") as f:
            if json.load(f).get("saved") == "trainable":
                raise ValueError(f"{FIELD}={teacher_dir}: it holds only adapter/LoRA "
                                 f"parameters over its base; export it first (`jaxmt export`)")
    ckpts = os.path.join(teacher_dir, "checkpoints")
    if not os.path.isdir(ckpts) or not any(n.isdigit() for n in os.listdir(ckpts)):
        raise FileNotFoundError(f"{FIELD}={teacher_dir}: no checkpoint there")
    return cfglib.load(teacher_dir)


def teacher_model_config(teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> ModelConfig:
    """The teacher's architecture as the step runs it: the student's (concrete) precision
    policy when it keeps the teacher's parameter dtype (bf16 compute over float32
    parameters on an accelerator, say), else the teacher's own.

    Raises:
      ValueError: both have adapters, routed differently (the batch's routing ids are
        indices into one ``AdapterConfig.langs``).
    """
    t, s = teacher_cfg.adapter, student_cfg.adapter
    if t.size and s.size and (t.langs, t.route) != (s.langs, s.route):
        raise ValueError(f"{FIELD}: teacher and student both have adapters but route them "
                         f"differently ({t.route} over {t.langs} vs {s.route} over {s.langs}); "
                         f"the batch carries one set of routing ids")
    policy = student_cfg.precision
    same = (policy in cfglib.PRECISIONS and teacher_cfg.precision in cfglib.PRECISIONS
            and cfglib.PRECISIONS[policy][1] == cfglib.PRECISIONS[teacher_cfg.precision][1])
    return dataclasses.replace(teacher_cfg, precision=policy) if same else teacher_cfg


def load_teacher_params(teacher_dir: str, abstract: PyTree) -> tuple[int, PyTree]:
    """``(step, params)``: the teacher's newest readable checkpoint, restored straight into
    the shards ``abstract`` (ShapeDtypeStructs with shardings) says. Only read."""
    from jaxmt.checkpoint import Checkpointer  # JAX from here on

    ckpt = Checkpointer(teacher_dir, async_save=False, read_only=True)
    try:
        return ckpt.restore_latest_params(abstract)
    finally:
        ckpt.close()
