"""`jaxmt quantize | prune | distill translate`: making a trained model small and fast.

Each reads a model directory (never writing into it) and writes a new one, or for
`distill translate` a distilled corpus; see jaxmt/compress/.
"""

from __future__ import annotations


def _add_quantize(sub) -> None:
    """`jaxmt quantize` (jaxmt/compress/quantize.py)."""


def _add_prune(sub) -> None:
    """`jaxmt prune` (jaxmt/compress/prune.py)."""


def _add_distill(sub) -> None:
    """`jaxmt distill translate` (jaxmt/compress/distill.py)."""


def add_parsers(sub) -> None:
    """The quantize, prune and distill subcommands."""
    _add_quantize(sub)
    _add_prune(sub)
    _add_distill(sub)
