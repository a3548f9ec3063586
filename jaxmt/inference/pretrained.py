"""Pretrained bases: what ``jaxmt train --init_from DIR`` starts from, and how a fine-tuned
model directory remembers it.

A base is one of three kinds of directory:

* ``hf``: a Hugging Face T5 / mT5 / MarianMT folder, converted in memory
  (:mod:`jaxmt.inference.hf_import`);
* ``converted``: a folder written by ``jaxmt convert`` (a ``tokenizer`` section and a
  params-only checkpoint);
* ``jaxmt``: a model directory trained by jaxmt (``spm.model`` and ``<2xx>`` tags).

A base is only ever read. Its **fingerprint** is a SHA-256 over the files that define
its parameters (config and weights; for a jaxmt directory, the chosen checkpoint step),
so a fine-tuned directory that stores only its own adapters or LoRA factors
(:data:`BASE_FILE` says ``"saved": "trainable"``) can refuse a base that changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from jaxmt import config as cfglib
from jaxmt.checkpoint import Checkpointer
from jaxmt.config import DataConfig, DecodeConfig, ModelConfig, TokenizerConfig
from jaxmt.fileio import write_atomic
from jaxmt.inference import hf_import
from jaxmt.inference.tokenizer import BASE_FILE
from jaxmt.modeling.param_tree import paths, subset

PyTree = Any

KINDS = ("hf", "converted", "jaxmt")


@dataclasses.dataclass(frozen=True)
class Base:
    """A base model directory, described without reading its weights.

    Attributes:
      directory: absolute path.
      kind: one of :data:`KINDS`.
      model: its architecture (precision and layer layout as asked).
      tokenizer: how it turns text into ids; None for a jaxmt-trained base (its
        ``spm.model`` with ``<2xx>`` tags).
      decode: its decoding defaults, if it has any.
      data: a jaxmt base's DataConfig (its languages), else None.
      step: the checkpoint step used (None for ``hf``).
      fingerprint: see the module docstring.
    """

    directory: str
    kind: str
    model: ModelConfig
    tokenizer: TokenizerConfig | None
    decode: DecodeConfig | None
    data: DataConfig | None
    step: int | None
    fingerprint: str

    @property
    def vocab_files(self) -> tuple[str, ...]:
        """The tokenizer files a fine-tuned directory copies from the base."""
        return self.tokenizer.vocab_files if self.tokenizer else (cfglib.VOCAB_FILE,)


def _sha_files(root: str, paths: list[str]) -> str:
    """SHA-256 over (relative path, content) of ``paths``, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _files_under(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]


def fingerprint(directory: str, kind: str, step: int | None) -> str:
    """The base's fingerprint: its config, weights and tokenizer files (see module doc)."""
    if kind == "hf":
        names = [n for n in os.listdir(directory)
                 if n in (hf_import.HF_CONFIG, "spiece.model", "source.spm", "target.spm",
                          "vocab.json")
                 or n.endswith((".safetensors", ".bin", ".index.json"))]
        return _sha_files(directory, [os.path.join(directory, n) for n in names])
    ckpt = os.path.join(directory, "checkpoints", str(step))
    files = [os.path.join(directory, cfglib.CONFIG_FILE)] + _files_under(ckpt)
    return _sha_files(directory, files)


def describe(directory: str, precision: str = "fp32", scan_layers: bool | None = None,
             step: int | None = None) -> Base:
    """Reads a base's configs (no weights) and fingerprints it.

    Args:
      directory: a Hugging Face T5/mT5/MarianMT folder, a ``jaxmt convert`` output or
        a jaxmt model directory.
      precision: the policy of the returned ModelConfig.
      scan_layers: a Hugging Face base's layer layout (default unrolled); a jaxmt base
        keeps its own.
      step: a jaxmt base's checkpoint step (default its newest).

    Raises:
      FileNotFoundError / ValueError: not a base, or one without a readable checkpoint;
        the message names the directory.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--init_from {directory}: no such directory")
    if hf_import.is_hf_checkpoint(directory):
        model, tok, decode = hf_import.read_configs(directory, precision=precision,
                                                    scan_layers=bool(scan_layers),
                                                    with_decode=True)
        return Base(directory, "hf", model, tok, decode, None, None,
                    fingerprint(directory, "hf", None))
    if not os.path.exists(os.path.join(directory, cfglib.CONFIG_FILE)):
        raise FileNotFoundError(f"--init_from {directory}: neither a Hugging Face checkpoint "
                                f"(config.json) nor a jaxmt model directory "
                                f"({cfglib.CONFIG_FILE})")
    cfgs = cfglib.load(directory)
    if os.path.exists(os.path.join(directory, BASE_FILE)) and read_record(directory).get(
            "saved") == "trainable":
        raise ValueError(f"--init_from {directory}: it holds only adapter/LoRA parameters "
                         f"over its own base; export it first (`jaxmt export --merge_lora`)")
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    step = steps[0] if step is None and steps else step
    if step not in steps:
        raise FileNotFoundError(f"--init_from {directory}: no checkpoint"
                                f"{'' if step is None else f' step {step}'} there")
    model = dataclasses.replace(cfgs["model"], precision=precision)
    kind = "converted" if "tokenizer" in cfgs else "jaxmt"
    return Base(directory, kind, model, cfgs.get("tokenizer"), cfgs.get("decode"),
                cfgs.get("data") if kind == "jaxmt" else None, step,
                fingerprint(directory, kind, step))


def load_params(base: Base, abstract: PyTree) -> PyTree:
    """The base's parameters, placed as ``abstract`` (ShapeDtypeStructs with shardings)
    says; ``abstract`` may hold more parameters (adapters, LoRA) than the base: only the
    base's paths are read and returned."""
    if base.kind == "hf":
        imported = hf_import.import_checkpoint(base.directory, precision=base.model.precision,
                                               scan_layers=base.model.scan_layers)
        want = subset(abstract, paths(imported.params))
        return jax.tree.map(
            lambda x, a: jax.make_array_from_callback(
                a.shape, a.sharding, lambda idx, x=x: np.asarray(x, a.dtype)[idx]),
            imported.params, want)
    saved = _saved_paths(base)
    ckpt = Checkpointer(base.directory, async_save=False, read_only=True)
    try:
        return ckpt.restore_params(base.step, subset(abstract, saved))
    finally:
        ckpt.close()


def _saved_paths(base: Base) -> set[str]:
    """The parameter paths a jaxmt base's checkpoint holds (those of its own model)."""
    from jaxmt.modeling.model import EncoderDecoderModel  # noqa: PLC0415 (heavy)

    return paths(EncoderDecoderModel(base.model).param_shapes())


# ----------------------------------------------------------------- the record

def record(base: Base, saved: str) -> dict:
    """What :data:`BASE_FILE` holds: the base and whether this directory's checkpoints
    hold every parameter (``"full"``) or only the trained ones (``"trainable"``)."""
    return {"init_from": base.directory, "kind": base.kind, "step": base.step,
            "fingerprint": base.fingerprint, "saved": saved,
            "langs": list(base.data.corpus_langs) if base.data else []}


def write_record(model_dir: str, rec: dict) -> None:
    write_atomic(os.path.join(model_dir, BASE_FILE), json.dumps(rec, indent=2))


def read_record(model_dir: str) -> dict:
    """The directory's :data:`BASE_FILE`, or {} when it was not fine-tuned from a base."""
    path = os.path.join(model_dir, BASE_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    for key in ("init_from", "kind", "fingerprint", "saved"):
        if key not in rec:
            raise ValueError(f"{path}: field {key!r} missing")
    return rec


def base_of(model_dir: str, precision: str = "fp32", scan_layers: bool | None = None) -> Base:
    """The base a trainable-only directory needs, checked against its recorded
    fingerprint.

    Raises:
      ValueError: the base is gone or differs from the one the directory was trained on
        (the message says which and why; nothing is loaded).
    """
    rec = read_record(model_dir)
    where = os.path.join(model_dir, BASE_FILE)
    try:
        base = describe(rec["init_from"], precision=precision, scan_layers=scan_layers,
                        step=rec.get("step"))  # the step it was trained on, hashed once
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{where}: its base {rec['init_from']} cannot be read ({e})") from None
    if base.fingerprint != rec["fingerprint"]:
        raise ValueError(f"{where}: the base {rec['init_from']} has changed since this model "
                         f"was trained on it (fingerprint {base.fingerprint[:12]}, recorded "
                         f"{rec['fingerprint'][:12]}): its adapters/LoRA factors would not fit; "
                         "restore the base or fine-tune again")
    return base
