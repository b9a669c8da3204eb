"""Images as training and screening data: the shared decode + preprocess batch function (bad
files become error rows), letterboxing and augmentation, knee-joint localisation and
native-resolution views (`knee/`), leakage-free splits, and the synthetic knee archive. Built on
`kneescreen.fileio`; knows nothing about models."""
