"""Making a trained model small and fast: int8 quantization (:mod:`.quantize`), magnitude
and structured pruning (:mod:`.prune`) and knowledge distillation (:mod:`.distill`).

Each is measured on quality, size and speed by ``benchmarks/compression.py``.
"""
