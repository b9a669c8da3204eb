"""DICOM radiographs, one concern per module: `header` (parse, triage from the first bytes, the
checks made before any pixel is decoded), `meta` (header facts), `pixels` (the pinned decoders,
JPEG 2000 header checks), `display` (the grayscale display pipeline) and `read` (the whole-object
read that puts them together). Entry points: `kneescreen.fileio.reader`."""
