"""Training: the train state and step, the loop, the gin entry point, and fp16 loss scaling."""
