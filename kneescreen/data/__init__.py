"""Images as training and screening data: the shared decode + preprocess batch function (bad
files become error rows), letterboxing and augmentation, leakage-free splits, and the synthetic
knee archive. Built on `kneescreen.io`; knows nothing about models."""
