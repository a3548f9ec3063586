"""Data: the embedded corpus, SentencePiece vocabulary, seqio tasks and input pipeline."""
