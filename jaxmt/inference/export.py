"""``jaxmt export``: a fine-tuned model directory as one self-contained directory.

A run with adapters or LoRA over a frozen base (``jaxmt train --init_from``) stores only
its own parameters. Export loads them with the base (checking its fingerprint), folds
LoRA into the base weights with ``merge_lora`` (the same outputs at the base model's
cost), and writes every parameter, the configs and the tokenizer files as a params-only
checkpoint that ``jaxmt translate``, ``Translator.from_pretrained`` and ``--init_from``
read with no base. The source directory is only read.
"""

from __future__ import annotations

import json
import os
import shutil

from jaxmt import config as cfglib
from jaxmt.checkpoint import save_params
from jaxmt.fileio import atomic_directory, write_atomic
from jaxmt.inference import pretrained
from jaxmt.inference.translator import Translator


def export(model_dir: str, out_dir: str, merge_lora: bool = False) -> Translator:
    """Writes ``model_dir``'s model, base included, to the new directory ``out_dir``.

    Raises:
      FileExistsError: ``out_dir`` exists and is not empty (nothing is written).
      ValueError: the base is missing or changed (see :func:`pretrained.base_of`).
    """
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"--out {out_dir}: already exists and is not empty")
    tr = Translator.from_pretrained(model_dir, merge_lora=merge_lora)
    write_model(model_dir, out_dir, tr.model.cfg, tr.params,  # LoRA folded in: rank 0
                {"exported_from": os.path.abspath(model_dir)})
    return tr


def write_model(model_dir: str, out_dir: str, model_cfg: cfglib.ModelConfig, params,
                meta: dict) -> None:
    """Writes a self-contained model directory ``out_dir``: ``params`` (every parameter,
    as a params-only checkpoint at step 0), ``model_dir``'s configs with ``model_cfg`` in
    place of its model config, its tokenizer files and its base's language record.

    All or nothing: a failure leaves no ``out_dir``. ``model_dir`` is only read.

    Raises:
      FileExistsError: ``out_dir`` exists and is not empty.
    """
    cfgs = cfglib.load(model_dir)
    cfgs["model"] = model_cfg
    record = pretrained.read_record(model_dir)
    files = [cfglib.VOCAB_FILE] if "tokenizer" not in cfgs else list(cfgs["tokenizer"].vocab_files)
    with atomic_directory(out_dir) as tmp:  # a failed write leaves nothing behind
        for name in files:
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(tmp, name))
        meta = dict({"step": 0}, **meta)
        if record:
            meta["base"] = record
        save_params(str(tmp), params, meta=meta)
        write_atomic(os.path.join(tmp, cfglib.CONFIG_FILE), cfglib.to_json(**cfgs))
        if record.get("langs"):  # a jaxmt base's languages, for the tagged tokenizer
            write_atomic(os.path.join(tmp, pretrained.BASE_FILE),
                         json.dumps(dict(record, saved="full"), indent=2))
