"""Training: models, input, the training loop, export."""
