"""The target-language signal before every source text, and the text format of a model.

Pure Python on purpose (like :mod:`jaxmt.data.embedded`): the inference tokenizers
import it and must not pull in TensorFlow or seqio.

A *template* is the text put before every source sentence, with these placeholders:

* ``{src}``, ``{tgt}``: the source and target language codes (``"en"``, ``"pt-BR"``);
* ``{src_name}``, ``{tgt_name}``: their English names (:data:`LANG_NAMES`).

The three signals a base model may understand are all templates:

* jaxmt's own tag, :data:`TAG_TEMPLATE` ``"<2{tgt}> "`` (one vocabulary piece);
* T5's task prefix, :data:`T5_TEMPLATE` ``"translate {src_name} to {tgt_name}: "``;
* a multilingual opus-mt model's target token, :data:`MARIAN_TEMPLATE` ``">>{tgt}<< "``.

:func:`format_source` is the one place a template is applied, for training (the seqio
Tasks) and inference (:class:`jaxmt.inference.tokenizer.Tokenizer`) alike.

:class:`TextFormat` bundles a template with the vocabularies that tokenise the source
and the target, for Tasks that train an imported base model with its own tokenizer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import seqio

TAG_TEMPLATE = "<2{tgt}> "
T5_TEMPLATE = "translate {src_name} to {tgt_name}: "
MARIAN_TEMPLATE = ">>{tgt}<< "

# English names, as T5's task prefixes spell them ("translate English to German: ").
LANG_NAMES: dict[str, str] = {
    "af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan",
    "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "ga": "Irish", "gl": "Galician", "gu": "Gujarati",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian",
    "kk": "Kazakh", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian",
    "ml": "Malayalam", "mr": "Marathi", "ms": "Malay", "mt": "Maltese", "nb": "Norwegian Bokmål",
    "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sq": "Albanian",
    "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu",
    "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu",
    "uz": "Uzbek", "vi": "Vietnamese", "zh": "Chinese",
}

_PLACEHOLDER = re.compile(r"\{(src|tgt|src_name|tgt_name)\}")


def lang_name(code: str) -> str:
    """The English name of a language code: ``"de"`` -> ``"German"``.

    A code with subtags (``"pt-BR"``) takes its own entry when :data:`LANG_NAMES` has
    one, else its language's (``"Portuguese"``).

    Raises:
        ValueError: No name for the code; the message names it and how to add one.
    """
    name = LANG_NAMES.get(code) or LANG_NAMES.get(str(code).split("-")[0])
    if name is None:
        raise ValueError(f"no English name for language code {code!r} (a template's "
                         "{src_name}/{tgt_name}); use {src}/{tgt} in the template, write the "
                         "name into it, or add the code to jaxmt.data.signals.LANG_NAMES")
    return name


def placeholders(template: str) -> set[str]:
    """The placeholders a template uses: a subset of ``{"src", "tgt", "src_name", "tgt_name"}``."""
    return set(_PLACEHOLDER.findall(template))


def format_prefix(template: str, src: str | None, tgt: str | None) -> str:
    """The template with its placeholders filled in (the text before a source sentence).

    A missing code (``None``) fills ``{src}``/``{tgt}`` with ``""`` (the inference
    tokenizer's behaviour before the names existed); a name needs its code.

    Raises:
        ValueError: A ``{src_name}``/``{tgt_name}`` whose code is missing or has no name.
    """
    codes = {"src": src, "tgt": tgt}

    def fill(m: re.Match) -> str:
        key = m.group(1)
        if not key.endswith("_name"):
            return codes[key] or ""
        code = codes[key[:3]]
        if not code:
            side = "source" if key.startswith("src") else "target"
            raise ValueError(f"template {template!r} needs a {side} language for {{{key}}}")
        return lang_name(code)

    return _PLACEHOLDER.sub(fill, template)


def format_source(template: str, text: str, src: str | None, tgt: str | None) -> str:
    """``text`` after its formatted template: ``format_source("<2{tgt}> ", "Hi", "en", "de")``
    is ``"<2de> Hi"``, ``format_source(T5_TEMPLATE, "Hi", "en", "de")`` is
    ``"translate English to German: Hi"``.

    Raises:
        ValueError: See :func:`format_prefix`.
    """
    return format_prefix(template, src, tgt) + text


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How a model reads text: its vocabularies and its target-language signal.

    Given to :func:`jaxmt.data.tasks.register` (and ``register_corpus``,
    ``register_from_config``) to train on a base model's own tokenizer; build one with
    :func:`jaxmt.inference.tokenizer.text_format`. Each example's source is
    ``format_source(template, text, src, tgt)`` tokenised by ``input_vocab``, its
    target ``target_vocab``'s ids of the target text (both with EOS appended).

    Attributes:
        input_vocab: Tokenises the formatted source.
        target_vocab: Tokenises the target (the same object as ``input_vocab`` when the
            model has one vocabulary).
        template: The signal before every source (see the module docstring).
        files: Every file the two vocabularies read; the pre-tokenised cache
            (:func:`jaxmt.data.cache.vocab_digest`) fingerprints them all.
        salt: Anything else the ids depend on (e.g. Marian's id reordering); part of
            the cache's fingerprint.
        check: Optional ``check(src, tgt)`` raising ValueError for a direction the
            vocabulary cannot signal (e.g. no ``>>xx<<`` token for ``tgt``).
        kind: What the vocabulary is, for messages: ``"jaxmt"``, ``"t5"``, ``"marian"``.
    """

    input_vocab: "seqio.Vocabulary"
    target_vocab: "seqio.Vocabulary"
    template: str
    files: tuple[str, ...]
    salt: str = ""
    check: Callable[[str, str], None] | None = dataclasses.field(default=None, compare=False)
    kind: str = ""

    def __post_init__(self):
        if not self.files:
            raise ValueError("TextFormat.files: name at least one vocabulary file")
        object.__setattr__(self, "files", tuple(str(f) for f in self.files))

    def source(self, text: str, src: str, tgt: str) -> str:
        """The source text the model reads: :func:`format_source` with this template."""
        return format_source(self.template, text, src, tgt)

    def check_direction(self, src: str, tgt: str) -> None:
        """Raises ValueError when ``src -> tgt`` cannot be formatted or signalled."""
        format_prefix(self.template, src, tgt)
        if self.check is not None:
            self.check(src, tgt)
