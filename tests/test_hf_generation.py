"""A Hugging Face checkpoint's generation defaults as a DecodeConfig (no torch needed;
``test_decode_parity`` checks the outputs against ``generate()``)."""

import dataclasses

import numpy as np
import pytest

from jaxmt.config import IMPORTED_DECODE
from jaxmt.inference.hf_generation import decode_config, suppressed_ids
from jaxmt.inference.hf_config import ConfigFields, HFImportError
from jaxmt.inference.tokenizer import id_permutation

V = 10
PAD, EOS = V - 1, 0  # opus-mt: </s> 0, <unk> 1, <pad> last
TO_JAXMT = np.argsort(id_permutation(V, (PAD, EOS, 1)))  # original id -> jaxmt id
# The generation_config.json of Helsinki-NLP/opus-mt-* checkpoints (ids scaled down).
OPUS = {"bad_words_ids": [[PAD]], "bos_token_id": 0, "decoder_start_token_id": PAD,
        "eos_token_id": EOS, "forced_eos_token_id": EOS, "max_length": 512, "num_beams": 4,
        "pad_token_id": PAD, "renormalize_logits": True, "transformers_version": "4.32.0"}


def _decode(**fields):
    return decode_config(ConfigFields(fields, "generation_config.json"), TO_JAXMT)


def test_opus_mt_defaults():
    d = _decode(**OPUS)
    want = dataclasses.replace(
        IMPORTED_DECODE, strategy="beam", beam_size=4, length_penalty="power", alpha=1.0,
        early_stopping="heuristic", max_len_a=0.0, max_len_b=511, suppressed_ids=(0,),
        forced_eos=True, no_repeat_ngram_size=0)
    assert d == want


def test_empty_config_is_generate_default():
    """Nothing set: greedy, no n-gram blocking (not jaxmt's trained-model default 4),
    and the imported length limit."""
    d = _decode()
    assert (d.strategy, d.no_repeat_ngram_size, d.min_len, d.forced_eos) == ("greedy", 0, 1, False)
    assert (d.max_len_a, d.max_len_b) == (IMPORTED_DECODE.max_len_a, IMPORTED_DECODE.max_len_b)
    assert (d.length_penalty, d.alpha, d.early_stopping) == ("power", 1.0, "heuristic")


@pytest.mark.parametrize("fields,want", [
    (dict(num_beams=5, num_return_sequences=3, length_penalty=0.6, early_stopping=True),
     dict(strategy="beam", beam_size=5, n_best=3, alpha=0.6, early_stopping="first")),
    (dict(num_beams=2, early_stopping="never"), dict(early_stopping="never")),
    (dict(max_length=20, min_length=5), dict(max_len_a=0.0, max_len_b=19, min_len=5)),
    # max_new_tokens / min_new_tokens win over max_length / min_length, as in generate().
    (dict(max_length=20, max_new_tokens=7, min_length=5, min_new_tokens=2),
     dict(max_len_b=7, min_len=3)),
    (dict(no_repeat_ngram_size=3, repetition_penalty=1.2),
     dict(no_repeat_ngram_size=3, repetition_penalty=1.2)),
    (dict(do_sample=True, temperature=0.7, top_p=0.9, num_return_sequences=2),
     dict(strategy="sample", temperature=0.7, top_k=50, top_p=0.9, num_decodes=2, n_best=2)),
    (dict(do_sample=True, top_k=0), dict(strategy="sample", top_k=0)),
    # Sampling-only fields are ignored when not sampling, as generate() ignores them.
    (dict(top_k=5, typical_p=0.5), dict(strategy="greedy", top_k=0)),
    # EOS is never suppressed (the reference drops it from bad words).
    (dict(bad_words_ids=[[5], [EOS]], suppress_tokens=[3]),
     dict(suppressed_ids=(int(TO_JAXMT[3]), int(TO_JAXMT[5])))),
])
def test_field_mapping(fields, want):
    d = _decode(**fields)
    assert {k: getattr(d, k) for k in want} == want


@pytest.mark.parametrize("fields,name", [
    ({"bad_words_ids": [[5, 6]]}, "bad_words_ids"),
    ({"forced_eos_token_id": 5}, "forced_eos_token_id"),
    ({"forced_bos_token_id": 5}, "forced_bos_token_id"),
    ({"decoder_start_token_id": 0}, "decoder_start_token_id"),
    ({"eos_token_id": [EOS, 5]}, "eos_token_id"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"do_sample": True, "num_beams": 4}, "do_sample"),
    ({"num_return_sequences": 2}, "num_return_sequences"),
    ({"num_beam_groups": 2, "diversity_penalty": 0.5}, "num_beam_groups"),
    ({"do_sample": True, "typical_p": 0.5}, "typical_p"),
    ({"max_length": 1}, "max_length"),
    ({"suppress_tokens": [V]}, "suppress_tokens"),
])
def test_unsupported_fields_name_the_field(fields, name):
    with pytest.raises(HFImportError, match=rf"^generation_config\.json: {name}="):
        _decode(**fields)


def test_invalid_value_names_the_file():
    with pytest.raises(HFImportError, match=r"^generation_config\.json: .*temperature"):
        _decode(do_sample=True, temperature=0.0)


def test_suppressed_ids_in_jaxmt_ids():
    gen = ConfigFields({"bad_words_ids": [[PAD], [4]]}, "generation_config.json")
    assert suppressed_ids(gen, TO_JAXMT) == (0, int(TO_JAXMT[4]))
