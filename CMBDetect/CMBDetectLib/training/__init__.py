"""Training: sampling, augmentation and the training loop."""
