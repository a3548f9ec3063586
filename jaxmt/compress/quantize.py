"""``jaxmt quantize``: post-training int8 quantization of a trained model, for inference.

The projection weights (attention query/key/value/out, the MLP's ``wi_*``/``wo``, the
untied ``logits_dense``) and the token embedding become int8 with one float32 scale per
output channel (per vocabulary row for the embedding, which serves the lookup and the
tied output layer alike): round-to-nearest, symmetric, absmax over the contracted dims.
Norms, biases, relative-position tables and adapters stay float (they are tiny). The
quantized layout is the quantized model's own (:func:`jaxmt.modeling.layers.weight`):
which dims of a weight are output channels comes from the logical axes of the weight
and its ``_scale``, so scanned stacks (a leading ``layers`` axis, kept: one scale per
layer) and unrolled ones are handled alike.

Modes (``ModelConfig.quant``; the stored parameters are the same for both):

- ``int8``: weight-only. Each int8 weight is cast to the compute dtype and multiplied
  with float32 accumulation, then rescaled: a quarter of fp32's bytes, fp32's arithmetic.
- ``w8a8``: the activations too, per token, with int8 x int8 -> int32 dots.

A quantized model decodes only (``jaxmt train`` refuses it). LoRA is merged into the
weights before quantizing (the same outputs without the low-rank path); a model
fine-tuned over a frozen base is written whole, base included, like ``jaxmt export``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxmt import config as cfglib
from jaxmt.config import ModelConfig
from jaxmt.modeling import param_tree
from jaxmt.modeling.adapters import merge_lora
from jaxmt.modeling.model import EncoderDecoderModel
from jaxmt.modeling.quantized import SCALE_SUFFIX, absmax_int8

PyTree = Any
MODES = tuple(m for m in cfglib.QUANT_MODES if m != "none")


def _boxed_layout(cfg: ModelConfig) -> PyTree:
    """The model's abstract parameters with their logical axis names (no compile)."""
    model = EncoderDecoderModel(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8, 8)))


def _leaves(tree: PyTree, boxed: bool = False) -> dict[str, Any]:
    is_leaf = (lambda x: isinstance(x, nn.LogicallyPartitioned)) if boxed else None
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {param_tree.path_str(p): x for p, x in flat}


def quantize_params(params: PyTree, model_cfg: ModelConfig, mode: str = "int8",
                    progress: bool = False) -> tuple[PyTree, ModelConfig]:
    """A float model's parameters in the quantized layout of ``mode``.

    Args:
      params: unboxed float parameters of ``model_cfg``'s model (host or device arrays,
        unrolled or scanned layers); LoRA pairs are merged into their weights first.
      model_cfg: their config (``quant="none"``).
      mode: "int8" or "w8a8" (:data:`MODES`).
      progress: a progress bar over the parameters.

    Returns:
      ``(qparams, qcfg)``: ``qcfg`` is ``model_cfg`` with ``quant=mode`` (and LoRA
      merged away); ``qparams`` holds, for each quantized weight ``w``, int8 ``w`` and
      float32 ``w_scale``, and every other parameter as it was.

    Raises:
      ValueError: an unknown mode, an already quantized model, or parameters that are
        not ``model_cfg``'s (naming a path).
    """
    if mode not in MODES:
        raise ValueError(f"quantize: mode {mode!r}: choose one of {MODES}")
    if model_cfg.quant != "none":
        raise ValueError(f"ModelConfig.quant={model_cfg.quant!r}: the model is already "
                         "quantized; quantize its float source instead")
    if model_cfg.lora.rank:
        params, model_cfg = merge_lora(params, model_cfg)
    qcfg = dataclasses.replace(model_cfg, quant=mode)
    layout = _leaves(_boxed_layout(qcfg), boxed=True)
    given = _leaves(params)
    scales = {p for p in layout if p.endswith(SCALE_SUFFIX) and p[:-len(SCALE_SUFFIX)] in layout
              and layout[p[:-len(SCALE_SUFFIX)]].value.dtype == np.int8}
    want = set(layout) - scales
    if set(given) != want:
        extra, missing = sorted(set(given) - want), sorted(want - set(given))
        raise ValueError(f"quantize: the parameters are not this model's: "
                         f"{'unexpected ' + str(extra[:3]) if extra else ''}"
                         f"{' missing ' + str(missing[:3]) if missing else ''}")
    out = {}
    for path in tqdm(sorted(want), desc="quantize", unit="param", disable=not progress,
                     file=sys.stderr, dynamic_ncols=True):
        box, x = layout[path], given[path]
        if tuple(x.shape) != box.value.shape:
            raise ValueError(f"quantize: {path} has shape {tuple(x.shape)}, the model "
                             f"{box.value.shape}")
        if box.value.dtype != np.int8:
            out[path] = x.astype(box.value.dtype)
            continue
        kept = layout[path + SCALE_SUFFIX].names  # the output channels (and `layers`)
        reduce = [i for i, n in enumerate(box.names) if n not in kept]
        out[path], out[path + SCALE_SUFFIX] = absmax_int8(x, reduce)
    return _nest(out), qcfg


def dequantize_params(qparams: PyTree, qcfg: ModelConfig) -> tuple[PyTree, ModelConfig]:
    """The float model a quantized one stands for: each int8 weight times its scales,
    in the config's parameter dtype (for checks: "int8" computes exactly this model,
    up to rounding in the compute dtype)."""
    cfg = dataclasses.replace(qcfg, quant="none")
    layout, given = _leaves(_boxed_layout(qcfg), boxed=True), _leaves(qparams)
    out = {}
    for path, x in given.items():
        if path.endswith(SCALE_SUFFIX) and path[:-len(SCALE_SUFFIX)] in given:
            continue
        if path + SCALE_SUFFIX in given:
            kept = layout[path + SCALE_SUFFIX].names
            reduce = tuple(i for i, n in enumerate(layout[path].names) if n not in kept)
            scale = np.expand_dims(np.asarray(given[path + SCALE_SUFFIX]), reduce)
            x = np.asarray(x, np.float32) * scale
        out[path] = np.asarray(x).astype(jnp.dtype(cfg.param_dtype))
    return _nest(out), cfg


def _nest(flat: dict[str, Any]) -> PyTree:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``: the model's tree from its paths."""
    nested = {}
    for path, x in flat.items():
        node = nested
        *parents, name = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[name] = x
    return nested


def param_bytes(params: PyTree) -> int:
    """Bytes of a parameter tree's arrays (what it takes in memory)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def dir_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a model directory on disk)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def quantize(model_dir: str, out_dir: str, mode: str = "int8",
             progress: bool = True) -> dict:
    """Writes ``model_dir``'s model, quantized with ``mode``, as the new directory ``out_dir``.

    ``model_dir`` is a jaxmt model directory (trained, fine-tuned with adapters or LoRA
    over a base, exported, or converted from Hugging Face with ``jaxmt convert``); it
    is only read. The result is self-contained: ``Translator.from_pretrained``, ``jaxmt
    translate`` and ``jaxmt eval`` take it as it is.

    Returns:
      A summary: ``mode``, the float and the quantized parameters' bytes, and the bytes
      of ``out_dir`` on disk.

    Raises:
      FileExistsError: ``out_dir`` exists and is not empty (nothing is written).
      ValueError: not a jaxmt model directory, or already quantized.
    """
    from jaxmt.inference.export import write_model
    from jaxmt.inference.translator import Translator

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"--out {out_dir}: already exists and is not empty")
    if not os.path.isfile(os.path.join(model_dir, cfglib.CONFIG_FILE)):
        raise ValueError(f"--model_dir {model_dir}: no {cfglib.CONFIG_FILE}; quantize a jaxmt "
                         "model directory (convert a Hugging Face folder with `jaxmt convert`)")
    if (quant := cfglib.load(model_dir)["model"].quant) != "none":
        raise ValueError(f"--model_dir {model_dir}: already quantized (ModelConfig.quant="
                         f"{quant!r}); quantize its float source instead")
    tr = Translator.from_pretrained(model_dir, merge_lora=True)
    qparams, qcfg = quantize_params(tr.params, tr.model.cfg, mode, progress=progress)
    write_model(model_dir, out_dir, qcfg, qparams,
                {"quantized_from": os.path.abspath(model_dir), "quant": mode})
    return {"mode": mode, "float_param_bytes": param_bytes(tr.params),
            "param_bytes": param_bytes(qparams), "dir_bytes": dir_bytes(out_dir)}
