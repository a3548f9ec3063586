"""What every command shares: turning errors into one line, and cheap input checks."""

from __future__ import annotations

import os
import re

# Exceptions that mean bad input (a flag, a file, a config), not a bug in jaxmt.
USER_ERRORS = (ValueError, OSError, KeyError)
MAX_CHARS = 600  # TensorStore and XLA messages run to pages
_GIN_NOTE = re.compile(r"\s*In call to configurable .*$", re.DOTALL)  # gin's second line


def error_line(message: str) -> str:
    """``message`` as the one line ``error: ...`` the CLI prints on stderr."""
    text = " ".join(_GIN_NOTE.sub("", str(message)).split())
    if text.startswith("error:"):
        text = text[len("error:"):].lstrip()
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS] + "..."
    return f"error: {text or 'failed'}"


def describe(e: BaseException) -> str:
    """What went wrong, for :func:`error_line`; unexpected exceptions say how to see more."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")
    if isinstance(e, KeyError):
        return f"missing entry {e.args[0]!r}" if e.args else "a missing entry"
    if isinstance(e, USER_ERRORS):
        return str(e) or type(e).__name__
    text = " ".join(str(e).split())
    return (f"unexpected {type(e).__name__}{': ' + text[:MAX_CHARS - 100] if text else ''} "
            "(rerun with --debug for the traceback)")


def load_vocab(path: str, hint: str):
    """A SentencePiece model, or one ``error:`` line naming ``path`` plus ``hint`` (what
    to do) when it is missing or not a SentencePiece model (e.g. a binary, a text file)."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "no SentencePiece model there"
        raise SystemExit(f"error: {path}: {what}; {hint}")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:  # sentencepiece: "could not parse ModelProto"
        reason = " ".join(str(e).split())
        raise SystemExit(f"error: {path}: not a SentencePiece model ({reason}); {hint}") from e
