"""Models and the bundle: the CNN registry (`create_model`), fusion and calibration, the age/sex
models, the typed bundle manifest, `Bundle` (load, verify, predict) and the ensemble fitting that
turns trained members into a manifest. Pure PyTorch/numpy: no Ray here."""
