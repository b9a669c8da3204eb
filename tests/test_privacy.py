"""Pseudonyms: keyed, deterministic, never the raw identifier; the key must be a real secret."""

from __future__ import annotations

import re

import pytest

from kneescreen.errors import KneescreenError
from kneescreen.fileio.privacy import ENV_KEY, ENV_KEY_FILE, pseudonym_key, pseudonymise

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


# --- The key from a file (KNEESCREEN_PSEUDONYM_KEY_FILE: a mounted Kubernetes Secret) -----------

FILE_KEY = "a-mounted-secret-of-32-characters"


@pytest.fixture
def key_env(monkeypatch):
    """Neither variable set, whatever the developer's shell has."""
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    return monkeypatch


@pytest.mark.parametrize("content", [FILE_KEY, FILE_KEY + "\n", FILE_KEY + "\r\n", FILE_KEY + "\n\n"])
def test_key_from_file_strips_trailing_newline(key_env, tmp_path, content):
    """`kubectl create secret --from-file` keeps what `openssl rand -hex 32 > key` wrote, newline included."""
    path = tmp_path / "pseudonym_key"
    path.write_bytes(content.encode())
    key_env.setenv(ENV_KEY_FILE, str(path))
    assert pseudonym_key() == FILE_KEY.encode()
    assert pseudonym_key(required=False) == FILE_KEY.encode()


def test_key_file_and_variable_give_the_same_pseudonyms(key_env, tmp_path):
    path = tmp_path / "k"
    path.write_text(FILE_KEY + "\n")
    key_env.setenv(ENV_KEY_FILE, str(path))
    from_file = pseudonymise("MRN1", pseudonym_key())
    key_env.delenv(ENV_KEY_FILE)
    key_env.setenv(ENV_KEY, FILE_KEY)
    assert pseudonymise("MRN1", pseudonym_key()) == from_file


def test_variable_wins_over_file(key_env, tmp_path):
    path = tmp_path / "k"
    path.write_text(FILE_KEY)
    key_env.setenv(ENV_KEY_FILE, str(path))
    key_env.setenv(ENV_KEY, "the-variable-key-0123456789")
    assert pseudonym_key() == b"the-variable-key-0123456789"


def test_short_variable_is_refused_even_with_a_good_file(key_env, tmp_path):
    """The variable wins: a short one is an error, not a silent fall-back to the file."""
    path = tmp_path / "k"
    path.write_text(FILE_KEY)
    key_env.setenv(ENV_KEY_FILE, str(path))
    key_env.setenv(ENV_KEY, "short")
    with pytest.raises(KneescreenError, match="too short"):
        pseudonym_key()


@pytest.mark.parametrize("content,words", [("x" * 15, "too short"), ("x" * 15 + "\n", "too short"), ("", "empty"),
                                           ("\n", "empty")])
@pytest.mark.parametrize("required", [True, False])
def test_short_or_empty_key_file_is_refused(key_env, tmp_path, content, words, required):
    """A configured key file that holds no usable key fails even when a key is optional: an
    ephemeral key would silently break pseudonym linkage across runs."""
    path = tmp_path / "pseudonym_key"
    path.write_text(content)
    key_env.setenv(ENV_KEY_FILE, str(path))
    with pytest.raises(KneescreenError) as exc:
        pseudonym_key(required=required)
    msg = str(exc.value)
    assert ENV_KEY_FILE in msg and str(path) in msg and words in msg
    if content.strip():
        assert content.strip() not in msg  # the (bad) secret itself is not echoed


def test_missing_key_file_names_the_file(key_env, tmp_path):
    path = tmp_path / "not-mounted" / "pseudonym_key"
    key_env.setenv(ENV_KEY_FILE, str(path))
    with pytest.raises(KneescreenError) as exc:
        pseudonym_key()
    msg = str(exc.value)
    assert str(path) in msg and "cannot read" in msg and ENV_KEY in msg  # says how to fix it


def test_unreadable_key_file_is_an_error_not_a_crash(key_env, tmp_path):
    """A directory where the file should be (a volume mounted without `items`) is reported, not raised raw."""
    key_env.setenv(ENV_KEY_FILE, str(tmp_path))
    with pytest.raises(KneescreenError, match="cannot read the key file"):
        pseudonym_key()


def test_binary_key_file_is_refused_without_echoing_it(key_env, tmp_path):
    secret = bytes(range(256))[::-1] * 2
    path = tmp_path / "k"
    path.write_bytes(secret)
    key_env.setenv(ENV_KEY_FILE, str(path))
    with pytest.raises(KneescreenError, match="not UTF-8") as exc:
        pseudonym_key()
    assert repr(secret)[2:30] not in str(exc.value)


def test_no_variable_and_no_file_mentions_both(key_env):
    with pytest.raises(KneescreenError) as exc:
        pseudonym_key()
    msg = str(exc.value)
    assert "not set" in msg and ENV_KEY in msg and ENV_KEY_FILE in msg
