"""Reading Hugging Face config files: errors that name the field and the file.

Shared by :mod:`jaxmt.inference.hf_import` (architecture, weights, tokenizer) and
:mod:`jaxmt.inference.hf_generation` (generation defaults).
"""

from __future__ import annotations

from typing import Any

# Hugging Face activation names -> jaxmt's (ModelConfig.mlp_activations).
ACTIVATIONS = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu",
               "gelu_pytorch_tanh": "gelu", "silu": "silu", "swish": "silu"}
_MISSING = object()


class HFImportError(ValueError):
    """A checkpoint jaxmt cannot represent exactly; the message names the cause."""


class ConfigFields:
    """config.json access whose errors name the field and the file."""

    def __init__(self, raw: dict, path: str):
        self.raw, self.path = raw, path

    def get(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.raw and self.raw[name] is not None:
            return self.raw[name]
        if default is _MISSING:
            raise HFImportError(f"{self.path}: missing field {name!r}")
        return default

    def fail(self, name: str, msg: str):
        raise HFImportError(f"{self.path}: {name}={self.raw.get(name)!r}: {msg}")

    def token_id(self, name: str, default: Any = _MISSING) -> int:
        v = self.get(name, default)
        if isinstance(v, list):  # newer configs allow several EOS ids
            if len(v) != 1:
                self.fail(name, "jaxmt supports exactly one id")
            v = v[0]
        return int(v)

    def activation(self, name: str, value: str) -> str:
        if value not in ACTIVATIONS:
            self.fail(name, f"unsupported activation {value!r}; supported: {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[value]
