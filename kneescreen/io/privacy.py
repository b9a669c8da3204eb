"""Pseudonymous identifiers: keyed HMAC-SHA256, never raw patient identifiers in outputs or logs.

The key comes from ``KNEESCREEN_PSEUDONYM_KEY`` (a secret: Kubernetes secret, AWS Secrets Manager).
The same key gives the same pseudonym across runs, so longitudinal queries work; rotating it
breaks that link on purpose (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from kneescreen.errors import KneescreenError

ENV_KEY = "KNEESCREEN_PSEUDONYM_KEY"


def pseudonym_key(required: bool = True) -> bytes:
    """The HMAC key from the environment.

    Raises:
        KneescreenError: when ``required`` and the variable is unset or shorter than 16 bytes.
    """
    value = os.environ.get(ENV_KEY, "")
    if len(value) >= 16:
        return value.encode()
    if required:
        raise KneescreenError(
            f"{ENV_KEY} is {'too short' if value else 'not set'}: set it to a secret of at least 16 "
            f"characters (e.g. `export {ENV_KEY}=$(openssl rand -hex 32)`); the same key must be "
            "used for every run whose pseudonyms should match"
        )
    return secrets.token_bytes(32)  # ephemeral: pseudonyms stable within this process only


def pseudonymise(value: str | None, key: bytes, kind: str = "p") -> str | None:
    """``kind`` + '_' + 20 hex chars of HMAC-SHA256(key, value); None stays None."""
    if value is None or str(value).strip() == "":
        return None
    digest = hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}_{digest[:20]}"
