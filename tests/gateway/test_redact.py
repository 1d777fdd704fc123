"""gateway.redact against generated URLs, headers and texts: what must be hidden never survives."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.redact as _redact
from gateway.redact import MASK, redact, redact_text, redact_url, remember

# secrets long enough to be recognisable in the output, in the characters a URL carries unescaped
secret = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~", min_size=6, max_size=30)
name = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
host = st.sampled_from(["example.com", "127.0.0.1", "[::1]", "hooks.plant.local", "h"])
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(deadline=None)  # no wall-clock bound: a loaded CI machine is not a failure
@given(user=secret, password=secret, key=name, value=secret, host=host, before=words, after=words)
def test_url_credentials_and_query_values_never_survive_in_text(
    user: str, password: str, key: str, value: str, host: str, before: str, after: str
) -> None:
    url = f"https://{user}:{password}@{host}:8443/p/a?{key}={value}&other={quote(value)}"
    text = f"{before} {url} {after}"
    out = redact_text(text)
    for s in (password, value):
        if s not in before + after:  # the surrounding words may hold it by chance
            assert s not in out, (text, out)
    assert f"{MASK}@" in out and f"{key}={MASK}" in out


@settings(deadline=None)  # no wall-clock bound: a loaded CI machine is not a failure
@given(user=secret, password=secret, host=host)
def test_redact_url_keeps_where_it_points(user: str, password: str, host: str) -> None:
    out = redact_url(f"mqtt://{user}:{password}@{host}:1883/x")
    assert out == f"mqtt://{MASK}@{host}:1883/x"


@settings(deadline=None)  # no wall-clock bound: a loaded CI machine is not a failure
@given(token=secret, before=words)
def test_bearer_credentials_never_survive(token: str, before: str) -> None:
    out = redact_text(f"{before} Authorization: Bearer {token}")
    if token not in before:
        assert token not in out


@settings(deadline=None)  # no wall-clock bound: a loaded CI machine is not a failure
@given(headers=st.dictionaries(name, secret, min_size=1, max_size=4), password=secret)
def test_header_values_and_secret_keys_are_masked_in_data(headers: dict[str, str], password: str) -> None:
    out = redact({"node": {"headers": headers, "password": password, "nested": [{"api_key": password}]}})
    assert out["node"]["headers"] == dict.fromkeys(headers, MASK)
    assert out["node"]["password"] == MASK and out["node"]["nested"][0]["api_key"] == MASK


@settings(deadline=None)  # no wall-clock bound: a loaded CI machine is not a failure
@given(value=secret, before=words, after=words)
def test_remembered_secrets_are_hidden_anywhere(value: str, before: str, after: str) -> None:
    # the registry is process-wide: put it back, or "000000" would be masked in every later test
    known, pattern = set(_redact._known), _redact._known_re
    try:
        remember([value])
        out = redact_text(before + value + after)
        assert value not in out or value in before + after
    finally:
        _redact._known, _redact._known_re = known, pattern


def test_a_text_redacted_before_a_secret_was_remembered_is_redacted_again() -> None:
    # short texts' results are kept (a polled console redacts the same ones each time): one kept
    # from before a secret was known must not be handed out after
    known, pattern = set(_redact._known), _redact._known_re
    text = "connection plant: lost (broker said s3cr3t-pw-9)"
    try:
        assert redact_text(text) == text
        assert redact({"error": text}) == {"error": text}
        remember(["s3cr3t-pw-9"])
        assert redact_text(text) == f"connection plant: lost (broker said {MASK})"
        assert redact({"error": text}) == {"error": f"connection plant: lost (broker said {MASK})"}
    finally:
        _redact._known, _redact._known_re = known, pattern
    assert redact_text(text) == text


def _plain_redact(value: object, key: str = "") -> object:
    """redact as written before its results were kept: the reference it must equal."""
    if isinstance(value, dict):
        if key and _redact._HEADERS_KEY.match(key):
            return {k: _redact._mask(v) for k, v in value.items()}
        return {
            k: _redact._mask(v) if _redact._SECRET_KEY.search(str(k)) else _plain_redact(v, str(k))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_plain_redact(v, key) for v in value]
    if isinstance(value, str):
        return _redact._redact_text(value, _redact._known_re) if value else value
    return value


_KEYS = st.one_of(name, st.sampled_from(["password", "api_key", "headers", "token", "state", "error", "x-token"]))
_TEXTS = st.one_of(
    words,
    st.sampled_from(["running", "https://u:p@h/x?a=1", "Bearer abcdef", "password=hunter22", '{"token": "abc"}']),
)
_DATA = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _TEXTS),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=20,
)


@settings(deadline=None)  # no wall-clock bound: a loaded CI machine is not a failure
@given(data=_DATA)
def test_redact_equals_the_plain_walk_every_time(data: object) -> None:
    want = _plain_redact(data)
    assert redact(data) == want
    assert redact(data) == want  # again, from what the first call kept
