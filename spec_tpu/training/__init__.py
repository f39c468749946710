"""The embedded pair: corpus, training and distillation."""
