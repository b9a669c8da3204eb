"""Pseudonyms: keyed, deterministic, never the raw identifier; the key must be a real secret."""

from __future__ import annotations

import re

import pytest

from kneescreen.errors import KneescreenError
from kneescreen.io.privacy import ENV_KEY, pseudonym_key, pseudonymise

KEY = b"0123456789abcdef-test"
OTHER = b"fedcba9876543210-test"


@pytest.mark.parametrize("value", ["MRN12345678", "1.2.826.0.1.3680043.10.1137.42", "SYNTH^ANNA00001", "42", 42])
def test_deterministic_for_one_key(value):
    assert pseudonymise(value, KEY) == pseudonymise(value, KEY)
    assert pseudonymise(value, KEY, "s") == pseudonymise(value, KEY, "s")


@pytest.mark.parametrize("value", ["MRN12345678", "1.2.826.0.1.3680043.10.1137.42"])
def test_format_and_no_raw_value(value):
    for kind in ("p", "s"):
        out = pseudonymise(value, KEY, kind)
        assert re.fullmatch(rf"{kind}_[0-9a-f]{{20}}", out), out
        assert value not in out
        assert value.lower() not in out.lower()


def test_differs_across_keys():
    assert pseudonymise("MRN12345678", KEY) != pseudonymise("MRN12345678", OTHER)


def test_differs_across_kinds():
    """A patient id and a study uid with the same text do not get the same pseudonym."""
    p, s = pseudonymise("X1", KEY, "p"), pseudonymise("X1", KEY, "s")
    assert p != s
    assert p[2:] != s[2:]  # not just a different prefix


def test_differs_across_values():
    values = [f"MRN{i:08d}" for i in range(500)]
    assert len({pseudonymise(v, KEY) for v in values}) == len(values)


def test_str_and_int_ids_match():
    """An id read as a number from one source and as text from another links up."""
    assert pseudonymise(123456, KEY) == pseudonymise("123456", KEY)


@pytest.mark.parametrize("value", [None, "", "   ", "\t"])
def test_missing_values_stay_missing(value):
    assert pseudonymise(value, KEY) is None
    assert pseudonymise(value, KEY, "s") is None


def test_key_from_environment(monkeypatch):
    monkeypatch.setenv(ENV_KEY, "a-real-secret-of-32-characters!!")
    assert ENV_KEY == "KNEESCREEN_PSEUDONYM_KEY"
    assert pseudonym_key() == b"a-real-secret-of-32-characters!!"
    assert pseudonym_key(required=False) == b"a-real-secret-of-32-characters!!"


def test_exactly_sixteen_characters_is_enough(monkeypatch):
    monkeypatch.setenv(ENV_KEY, "x" * 16)
    assert pseudonym_key() == b"x" * 16


@pytest.mark.parametrize("value,words", [(None, "not set"), ("", "not set"), ("s3cr3tQ", "too short"),
                                         ("x" * 15, "too short")])
def test_missing_or_short_key_is_refused(monkeypatch, value, words):
    if value is None:
        monkeypatch.delenv(ENV_KEY, raising=False)
    else:
        monkeypatch.setenv(ENV_KEY, value)
    with pytest.raises(KneescreenError) as exc:
        pseudonym_key()
    msg = str(exc.value)
    assert "KNEESCREEN_PSEUDONYM_KEY" in msg and words in msg
    if value:
        assert value not in msg.replace(ENV_KEY, "")  # the (bad) secret itself is not echoed


def test_optional_key_is_ephemeral_when_unset(monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    a, b = pseudonym_key(required=False), pseudonym_key(required=False)
    assert len(a) >= 16 and a != b
    assert pseudonymise("MRN1", a) != pseudonymise("MRN1", b)
