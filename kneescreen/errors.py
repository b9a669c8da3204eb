"""Error types shared across kneescreen.

`DecodeError` describes a bad *input* (a file), so it carries a stable machine-readable
``error_code`` that ends up in output rows. Everything else that reaches a user is a
`KneescreenError` with a message that says how to fix it.
"""

from __future__ import annotations

# Stable error codes for per-file failures. Output rows and dashboards key on these strings:
# add new ones, never rename.
ERROR_CODES: dict[str, str] = {
    "not_dicom": "not a DICOM, PNG or JPEG file",
    "truncated": "file ends early or pixel data is shorter than the header says",
    "no_pixel_data": "DICOM object without an image (e.g. a structured report or a header-only file)",
    "unsupported_transfer_syntax": "pixel data encoded with a transfer syntax no pinned decoder handles",
    "unsupported_photometric": "photometric interpretation that is not a grayscale radiograph",
    "pixel_header_mismatch": "header and pixel data disagree (size, bit depth or signedness)",
    "implausible_pixels": "decoded pixels do not look like an image (uniform or noise)",
    "too_large": "image larger than the configured pixel limit (decompression-bomb guard)",
    "multiframe": "multi-frame object refused by the reader's multiframe policy",
    "malformed": "header could not be parsed",
    "decode_failed": "decoder rejected the pixel data",
    "read_failed": "object could not be read from storage",
    "retries_exhausted": "a transient error (read_failed, changed_during_read) persisted through --max-retries "
                         "incremental runs; the message names the last error",
    "vanished": "object deleted between the listing and its read",
    "access_denied": "storage refused the read (S3 403); the message names the missing permission",
    "changed_during_read": "the object changed between listing and read; the next run re-lists it",
    "joint_not_found": "no knee joint could be located on the image with enough confidence",
}


class KneescreenError(Exception):
    """A usage or configuration error with a message that says how to fix it."""


class DecodeError(KneescreenError):
    """A file could not be turned into a radiograph.

    Attributes:
        error_code: one of `ERROR_CODES`.
        message: what went wrong, in words a radiographer or data engineer can act on.
    """

    def __init__(self, error_code: str, message: str):
        if error_code not in ERROR_CODES:
            raise ValueError(f"unknown error_code {error_code!r}; valid: {sorted(ERROR_CODES)}")
        super().__init__(f"{error_code}: {message}")
        self.error_code = error_code
        self.message = message
