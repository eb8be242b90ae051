"""Training: arguments, losses, curriculum stages, `ProCLIPTrainer`, data, collators, the embedding cache, stage 0."""
