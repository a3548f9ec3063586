"""Inference: the Translator, tokenizers, evaluation and Hugging Face import (no TensorFlow)."""
