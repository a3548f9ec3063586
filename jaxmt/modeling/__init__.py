"""Modeling: Flax layers, attention, the encoder-decoder network, decoding strategies, and
the Model (loss, scoring, ``predict_batch``)."""
