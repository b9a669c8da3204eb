"""Pseudonymous identifiers: keyed HMAC-SHA256, never raw patient identifiers in outputs or logs.

The key is a secret: ``KNEESCREEN_PSEUDONYM_KEY`` holds it, or ``KNEESCREEN_PSEUDONYM_KEY_FILE``
names a file that does (a Kubernetes Secret mounted as a volume, docs/operations.md). A file keeps
the secret out of the process environment, job metadata and the Ray dashboard. The same key gives
the same pseudonym across runs, so longitudinal queries work; rotating it breaks that link on
purpose (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from kneescreen.errors import KneescreenError

ENV_KEY = "KNEESCREEN_PSEUDONYM_KEY"
ENV_KEY_FILE = "KNEESCREEN_PSEUDONYM_KEY_FILE"
MIN_KEY_CHARS = 16
_HOW = (f"set {ENV_KEY} to a secret of at least {MIN_KEY_CHARS} characters, or {ENV_KEY_FILE} to a file "
        f"holding one (e.g. `openssl rand -hex 32 > key`); the same key must be used for every run whose "
        "pseudonyms should match")


def _key_from_file(path: str) -> str:
    """The key text in ``path`` without its trailing newline (what `echo` and editors add)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise KneescreenError(f"{ENV_KEY_FILE}={path}: cannot read the key file ({exc.strerror or type(exc).__name__}); "
                              f"{_HOW}") from None
    try:
        return raw.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise KneescreenError(f"{ENV_KEY_FILE}={path}: the key file is not UTF-8 text; {_HOW}") from None


def pseudonym_key(required: bool = True) -> bytes:
    """The HMAC key: ``KNEESCREEN_PSEUDONYM_KEY``, else the file named by ``KNEESCREEN_PSEUDONYM_KEY_FILE``.

    The variable wins when both are set (an explicit override for one run). Errors name the
    variable or the file, never the secret.

    Args:
        required: refuse to go on without a key; when False and no key is configured, an
            ephemeral random key is returned (pseudonyms are then stable within this process only).

    Raises:
        KneescreenError: when ``required`` and no key is set, the key is shorter than 16
            characters, or the key file cannot be read. A configured but unusable key file is an
            error even when not ``required``: silently ignoring it would hide a broken deployment.
    """
    value = os.environ.get(ENV_KEY, "")
    source = ENV_KEY
    path = os.environ.get(ENV_KEY_FILE, "")
    if not value and path:
        value, source = _key_from_file(path), f"{ENV_KEY_FILE}={path}"
        if len(value) < MIN_KEY_CHARS:
            raise KneescreenError(f"{source}: the key in the file is {'too short' if value else 'empty'}; {_HOW}")
    if len(value) >= MIN_KEY_CHARS:
        return value.encode()
    if required:
        raise KneescreenError(f"{source} is {'too short' if value else 'not set'}: {_HOW}")
    return secrets.token_bytes(32)  # ephemeral: pseudonyms stable within this process only


def pseudonymise(value: str | None, key: bytes, kind: str = "p") -> str | None:
    """``kind`` + '_' + 20 hex chars of HMAC-SHA256(key, value); None stays None."""
    if value is None or str(value).strip() == "":
        return None
    digest = hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}_{digest[:20]}"


def patient_pseudo_id(raw_id, key: bytes) -> str | None:
    """The pseudonymous patient id of a raw patient identifier: THE one function both screening
    (DICOM PatientID) and `kneescreen link` (a DXA registry's id column) go through, so the same
    patient gets the same pseudonym on both sides.

    Normalisation is leading/trailing whitespace only (DICOM pads odd-length values with a space;
    CSV exports add stray blanks). Nothing else: case, leading zeros and punctuation are kept, so
    ``MRN0042`` and ``mrn42`` are different patients. None or blank gives None.
    """
    if raw_id is None:
        return None
    return pseudonymise(str(raw_id).strip(), key, "p")
