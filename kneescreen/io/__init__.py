"""Bytes in and out: the `Store` (local folders and S3 behind one object), the radiograph reader,
keyed pseudonyms, and `kneescreen inspect`. Nothing here knows about models or Ray."""
