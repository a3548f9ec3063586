"""jaxmt: multilingual encoder-decoder translation in JAX/Flax.

``from jaxmt import Translator`` is the inference API; it needs no TensorFlow.
"""

__version__ = "0.1.0"
__all__ = ["Translator"]


def __getattr__(name):
    # Lazy, so `import jaxmt` stays cheap and the CLI starts fast.
    if name == "Translator":
        from jaxmt.inference.translator import Translator
        return Translator
    raise AttributeError(f"module 'jaxmt' has no attribute {name!r}")
