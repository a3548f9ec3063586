"""Data: the embedded corpus, your own corpora, SentencePiece vocabularies, seqio tasks and
the input pipeline. The only package that touches seqio / TensorFlow."""
