"""Knee-joint localisation, native-resolution regions of interest and radiogrammetry.

The letterboxed 160 px model input throws away the trabecular texture and cortical detail that
carry bone density. This package finds the knee joint on the full-resolution radiograph without
any labels, so that crops of fixed *physical* size (mm) can be taken at native resolution:

- `joint`: `locate_joints` / `locate_joint` -> `JointLocation` (row, centre, knee width, mm per
  pixel, confidence); a film without a knee-like joint gets ``joint_not_found``.
- `views`: `regions_of_interest` (proximal tibial metaphysis and distal femur, sized in mm),
  `tiles` (native tiles for a multiple-instance member) and `view_inputs`, which the decode
  batch function calls for the ``roi_*`` / ``tiles_*`` member inputs.
- `radiogrammetry`: `cortical_thickness`, femoral and tibial shaft cortical thickness and index.
- `qc`: `qc_montage`, a PNG grid of thumbnails with the placements drawn, for judging by eye.
- `_signal`: numpy smoothing, Otsu thresholds and resizing shared by the modules above.
"""
