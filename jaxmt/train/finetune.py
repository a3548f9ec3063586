"""``jaxmt train --init_from DIR``: start a run from a pretrained base.

The base (:mod:`jaxmt.inference.pretrained`: a Hugging Face T5/mT5/MarianMT folder, a
``jaxmt convert`` output or a jaxmt model directory) gives the parameters, the
architecture and the tokenizer; the run's gin files give the data, the schedule and
what may change on top of a base (:data:`FREE_MODEL_FIELDS`: dropout, remat, attention
implementation, precision, adapters, LoRA). The optimizer state starts fresh. The base
is only read; the new model directory gets its own copy of the tokenizer files and
``base.json``, the record of where it started (with the base's fingerprint).

With adapters or LoRA over a frozen base, the checkpoints hold only the trained
parameters (``base.json``: ``"saved": "trainable"``), and loading the model reads the
base again, refusing one whose fingerprint changed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from jaxmt import config as cfglib
from jaxmt.config import DataConfig, ModelConfig
from jaxmt.inference import pretrained

# ModelConfig fields a fine-tuning run may set over the base's: they change neither the
# base's parameters nor what they compute, or (adapter, lora) add parameters of their own.
FREE_MODEL_FIELDS = ("dropout_rate", "encoder_remat", "decoder_remat", "attention", "precision",
                     "adapter", "lora")


def model_config(base: pretrained.Base, asked: ModelConfig) -> ModelConfig:
    """The run's ModelConfig: the base's architecture, with the free fields the run set.

    ``asked`` is what the gin files built; a field that differs from ModelConfig's
    default was set by the run.

    Raises:
      ValueError: the run set an architecture field to something the base is not,
        naming each field.
    """
    # Declared defaults, not gin's: a bound field is one the run set.
    defaults = {f.name: cfglib.declared_default(ModelConfig, f.name)
                for f in dataclasses.fields(ModelConfig)}
    changes, clashes = {}, []
    for f in dataclasses.fields(ModelConfig):
        value = getattr(asked, f.name)
        if value == defaults[f.name]:
            continue  # not set by the run: the base's value stays
        if f.name in FREE_MODEL_FIELDS:
            changes[f.name] = value
        elif f.name == "scan_layers" and base.kind == "hf":
            changes[f.name] = value  # a Hugging Face base is converted to either layout
        elif value != getattr(base.model, f.name):
            clashes.append(f"ModelConfig.{f.name}={value!r} (the base has "
                           f"{getattr(base.model, f.name)!r})")
    if clashes:
        raise ValueError(f"--init_from {base.directory}: the architecture comes from the base, "
                         f"so these settings cannot apply: {'; '.join(clashes)}. Remove them "
                         f"(only {', '.join(FREE_MODEL_FIELDS)} may change)")
    # The base's precision is how it was converted/trained; the run's "auto" is resolved
    # later like any run's.
    changes.setdefault("precision", asked.precision)
    return dataclasses.replace(base.model, **changes)


def check_model_dir(model_dir: str, base: pretrained.Base | None) -> dict:
    """The record of a directory being resumed (``{}`` for a new one), checked against
    the base this run names.

    Raises:
      ValueError: the directory holds checkpoints of another start (another base, or
        none), or is itself an imported checkpoint that would be trained over.
    """
    rec = pretrained.read_record(model_dir)
    has_ckpts = os.path.isdir(os.path.join(model_dir, "checkpoints"))
    if base is None:
        if not rec and has_ckpts and "tokenizer" in _sections(model_dir):
            raise ValueError(f"--model_dir {model_dir} is an imported checkpoint (jaxmt "
                             f"convert): training would not start from its weights; fine-tune "
                             f"it with --init_from {model_dir} --model_dir NEW_DIR")
        return rec
    if rec:
        if rec["fingerprint"] != base.fingerprint:
            raise ValueError(f"--model_dir {model_dir} was started from {rec['init_from']} "
                             f"(fingerprint {rec['fingerprint'][:12]}), not from "
                             f"{base.directory} ({base.fingerprint[:12]}); use a new "
                             "--model_dir")
        return rec
    if has_ckpts:
        raise ValueError(f"--model_dir {model_dir} already holds checkpoints not started from "
                         f"{base.directory}; use a new --model_dir")
    if os.path.realpath(model_dir) == os.path.realpath(base.directory):
        raise ValueError(f"--model_dir {model_dir} is the base itself; the base is never "
                         "written to: use a new --model_dir")
    return rec


def _sections(model_dir: str) -> dict:
    path = os.path.join(model_dir, cfglib.CONFIG_FILE)
    return cfglib.load(model_dir) if os.path.exists(path) else {}


def tokenizer_config(base: pretrained.Base, data_cfg: DataConfig):
    """The fine-tuned directory's tokenizer section: the base's, with the run's source
    template (``DataConfig.input_prefix``, "auto": the base's own signal); None for a
    jaxmt base, whose tags are fixed.

    Raises:
      ValueError: ``input_prefix`` set for a jaxmt base.
    """
    from jaxmt.inference.tokenizer import default_template

    if base.tokenizer is None:
        if data_cfg.input_prefix != "auto":
            raise ValueError(f"DataConfig.input_prefix={data_cfg.input_prefix!r}: the base "
                             f"{base.directory} is a jaxmt model, which reads its <2xx> tags; "
                             "leave it 'auto'")
        return None
    template = (default_template(base.tokenizer) if data_cfg.input_prefix == "auto"
                else data_cfg.input_prefix)
    return dataclasses.replace(base.tokenizer, input_prefix=template)


def copy_vocab(base: pretrained.Base, model_dir: str) -> None:
    """Copies the base's tokenizer files into the new directory (never overwriting)."""
    for name in base.vocab_files:
        dst = os.path.join(model_dir, name)
        if not os.path.exists(dst):
            tmp = dst + ".tmp"
            shutil.copyfile(os.path.join(base.directory, name), tmp)
            os.replace(tmp, dst)
