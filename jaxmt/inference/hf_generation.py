"""A Hugging Face checkpoint's generation defaults as a jaxmt :class:`DecodeConfig`.

``generation_config.json`` (older checkpoints: the generation fields of ``config.json``)
says how ``generate()`` decodes by default; :func:`decode_config` turns it into the
``decode`` section that ``jaxmt convert`` writes and ``Translator`` follows. Unset
fields take ``generate()``'s defaults:

================================  =======================================================
Hugging Face                      jaxmt
================================  =======================================================
``num_beams`` (1), ``do_sample``  ``strategy`` greedy / beam (``beam_size``) / sample
``num_return_sequences`` (1)      ``n_best`` (and ``num_decodes`` when sampling)
``max_new_tokens``                ``max_len_a=0``, ``max_len_b=max_new_tokens``
``max_length``                    ``max_len_b=max_length - 1`` (it counts the decoder
                                  start token); neither set: jaxmt's imported default
                                  (:data:`jaxmt.config.IMPORTED_DECODE`), not the
                                  reference's 20 new tokens
``min_new_tokens``                ``min_len=min_new_tokens + 1`` (EOS included)
``min_length`` (0)                ``min_len=min_length``: the reference bans EOS while
                                  the sequence, start token included, is shorter than
                                  ``min_length``, so EOS can be the ``min_length``-th token
``length_penalty`` (1.0)          ``length_penalty="power"``, ``alpha``
``early_stopping`` (False)        ``False`` "heuristic", ``True`` "first", "never"
``no_repeat_ngram_size`` (0)      the same (0, not jaxmt's trained-model default 4)
``repetition_penalty`` (1.0)      the same
``bad_words_ids``,                ``suppressed_ids`` in jaxmt ids; EOS is never
``suppress_tokens``               suppressed (the reference drops it from bad words)
``forced_eos_token_id``           ``forced_eos`` (must be the EOS id)
``temperature``, ``top_k`` (50),  the same, when ``do_sample`` is true
``top_p``
================================  =======================================================

``decoder_start_token_id`` and ``eos_token_id`` must be jaxmt's start (PAD 0) and EOS
ids after the vocabulary's reordering. ``renormalize_logits`` (set by the opus-mt
checkpoints) is accepted, though jaxmt does not renormalise after banning ids: beam
scores then differ by the banned ids' probability (for opus-mt, that of the pad, which a
trained model leaves near 0; an EOS banned below ``min_length`` would count more).
Anything else that would change
the outputs (beam groups, constraints, forced first tokens, other sampling cut-offs,
multi-token bad words, ...) fails with an :class:`HFImportError` naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxmt.config import IMPORTED_DECODE, DecodeConfig
from jaxmt.data.vocab import EOS_ID, PAD_ID
from jaxmt.inference.hf_config import ConfigFields, HFImportError

# Fields that change generate()'s outputs and have no jaxmt equivalent -> their "off"
# values (None everywhere: unset).
_UNSUPPORTED = {
    "num_beam_groups": (1,), "diversity_penalty": (0.0,), "penalty_alpha": (),
    "force_words_ids": ([],), "constraints": ([],), "forced_bos_token_id": (),
    "forced_decoder_ids": ([],), "begin_suppress_tokens": ([],),
    "encoder_no_repeat_ngram_size": (0,), "encoder_repetition_penalty": (1.0,),
    "exponential_decay_length_penalty": (), "sequence_bias": ({},), "guidance_scale": (1.0,),
    "stop_strings": ([],), "dola_layers": (), "max_time": (), "watermarking_config": (),
}
# The same, for sampling only (the reference ignores them otherwise).
_UNSUPPORTED_SAMPLING = {"typical_p": (1.0,), "min_p": (0.0,), "epsilon_cutoff": (0.0,),
                         "eta_cutoff": (0.0,), "top_h": ()}
_EARLY_STOPPING = {False: "heuristic", True: "first", "never": "never"}


def _map_id(gen: ConfigFields, name: str, value: Any, to_jaxmt: np.ndarray) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(to_jaxmt):
        gen.fail(name, f"expected token ids in [0, {len(to_jaxmt)})")
    return int(to_jaxmt[value])


def suppressed_ids(gen: ConfigFields, to_jaxmt: np.ndarray) -> tuple[int, ...]:
    """The jaxmt ids never generated: single-token ``bad_words_ids`` and
    ``suppress_tokens``, mapped through ``to_jaxmt`` (original id -> jaxmt id), EOS
    left out as the reference does.

    Raises:
        HFImportError: a multi-token bad word (jaxmt bans single ids only) or a bad id.
    """
    out = set()
    for seq in gen.get("bad_words_ids", []):
        if not isinstance(seq, list) or len(seq) != 1:
            gen.fail("bad_words_ids", "only single-token entries are supported (jaxmt bans "
                     "ids, not sequences)")
        out.add(_map_id(gen, "bad_words_ids", seq[0], to_jaxmt))
    for i in gen.get("suppress_tokens", []):
        out.add(_map_id(gen, "suppress_tokens", i, to_jaxmt))
    out.discard(EOS_ID)
    return tuple(sorted(out))


def _check_special(gen: ConfigFields, to_jaxmt: np.ndarray) -> None:
    """The generation config's start and EOS ids must be the model's (jaxmt's 0 and 1)."""
    for name, want, what in (("decoder_start_token_id", PAD_ID, "starts decoding with "
                              "the pad id"), ("eos_token_id", EOS_ID, "ends at one EOS id")):
        if gen.get(name, None) is None:
            continue
        ids = gen.get(name)
        ids = ids if isinstance(ids, list) else [ids]
        if len(ids) != 1 or _map_id(gen, name, ids[0], to_jaxmt) != want:
            gen.fail(name, f"jaxmt {what} (here the original id {int(np.argsort(to_jaxmt)[want])})")


def decode_config(gen: ConfigFields, to_jaxmt: np.ndarray) -> DecodeConfig:
    """The checkpoint's generation defaults (see the module docstring).

    Args:
        gen: ``generation_config.json``'s fields, or ``config.json``'s without one.
        to_jaxmt: [vocab] original id -> jaxmt id (Marian's vocabulary is reordered).

    Raises:
        HFImportError: a setting jaxmt cannot reproduce; the message names the field and
            the file.
    """
    for name, off in _UNSUPPORTED.items():
        if gen.get(name, None) not in (None, *off):
            gen.fail(name, "not supported by jaxmt's decoding")
    _check_special(gen, to_jaxmt)
    beams, sample = int(gen.get("num_beams", 1)), bool(gen.get("do_sample", False))
    outputs = int(gen.get("num_return_sequences", 1))
    over: dict[str, Any] = {"n_best": outputs, "suppressed_ids": suppressed_ids(gen, to_jaxmt),
                            "no_repeat_ngram_size": int(gen.get("no_repeat_ngram_size", 0)),
                            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
                            "length_penalty": "power",
                            "alpha": float(gen.get("length_penalty", 1.0))}
    if sample:
        if beams > 1:
            gen.fail("do_sample", f"beam sampling (num_beams={beams}) is not supported")
        for name, off in _UNSUPPORTED_SAMPLING.items():
            if gen.get(name, None) not in (None, *off):
                gen.fail(name, "not supported by jaxmt's sampling")
        over.update(strategy="sample", num_decodes=outputs,
                    temperature=float(gen.get("temperature", 1.0)),
                    top_k=int(gen.get("top_k", 50)), top_p=float(gen.get("top_p", 1.0)))
    elif beams > 1:
        over.update(strategy="beam", beam_size=beams)
    else:  # beam_size keeps jaxmt's default, for a caller who switches to beam search
        over["strategy"] = "greedy"
    if not sample and outputs > max(beams, 1):
        gen.fail("num_return_sequences", f"more outputs than num_beams={beams}")

    stop = gen.get("early_stopping", False)
    if not (isinstance(stop, bool) or stop == "never"):
        gen.fail("early_stopping", "expected true, false or \"never\"")
    over["early_stopping"] = _EARLY_STOPPING[stop]

    if gen.get("max_new_tokens", None) is not None:
        over.update(max_len_a=0.0, max_len_b=int(gen.get("max_new_tokens")))
    elif gen.get("max_length", None) is not None:  # counts the decoder start token
        if int(gen.get("max_length")) < 2:
            gen.fail("max_length", "leaves no room for a token after the decoder start")
        over.update(max_len_a=0.0, max_len_b=int(gen.get("max_length")) - 1)
    if gen.get("min_new_tokens", None) is not None:
        over["min_len"] = int(gen.get("min_new_tokens")) + 1
    else:
        over["min_len"] = max(int(gen.get("min_length", 0)), 1)

    forced = gen.get("forced_eos_token_id", None)
    if forced is not None:
        forced = forced if isinstance(forced, list) else [forced]
        if [_map_id(gen, "forced_eos_token_id", i, to_jaxmt) for i in forced] != [EOS_ID]:
            gen.fail("forced_eos_token_id", "jaxmt can force only the EOS id")
        over["forced_eos"] = True
    try:
        return dataclasses.replace(IMPORTED_DECODE, **over)
    except (TypeError, ValueError) as e:  # e.g. temperature 0, a beam smaller than n_best
        msg = (str(e).splitlines() or [repr(e)])[0]  # gin appends a line
        raise HFImportError(f"{gen.path}: {msg}") from None
