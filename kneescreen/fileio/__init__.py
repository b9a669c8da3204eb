"""Bytes in and out: the `Store` (`store`: local folders and S3 behind one object, over the
`_store_local` / `_store_s3` backends), the radiograph reader (`reader` entry points over
`radiograph`, `raster`, `plausibility` and `dicom/`), keyed pseudonyms (`privacy`), and
`kneescreen inspect` (`probe`). Nothing here knows about models or Ray."""
