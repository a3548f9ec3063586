"""Modeling: Flax layers, attention, the encoder-decoder network, decoding, and the Model (loss, scoring, predict_batch)."""
