"""Detection: preprocessing, the residual U-Net, 2.5D inference, lesions, outputs."""
