"""One redaction for everything that leaves the process: API answers, ``/healthz``, ``/metrics``, the
WebSocket, log lines (stderr and the console's logs page) and dead-letter reasons.

Hidden as ``***``: the userinfo and every query value of a URL (wherever a URL appears in text), the
credential after ``Bearer``/``Basic``, ``password=…``-style pairs, every header value, every option
the config schema marks secret (``"secret": true`` in ``sluice schema``; :data:`SECRET` in an options
model), and — anywhere in any text — the values of those options and headers in the configs loaded
to run (:func:`remember` is called at load), so an error message that quotes one is caught too.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined

__all__ = [
    "MASK",
    "SECRET",
    "mask",
    "redact",
    "redact_options",
    "redact_text",
    "redact_url",
    "remember",
    "secret_field",
    "secrets_of",
]

MASK = "***"
SECRET: dict[str, Any] = {"secret": True}
"""``json_schema_extra`` of an option whose value is a secret (for a mapping: every value is)."""


def secret_field(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A pydantic ``Field`` for an option whose value is a secret (a token, a password, headers).

    Takes what ``Field`` takes. The option is marked ``"secret": true`` in its JSON Schema (``sluice
    schema``, the editor's forms), its value is shown as ``***`` wherever the config is shown
    (API, console, editor), and the value itself is hidden in every text that leaves the gateway
    (logs, dead-letter reasons, errors). For a mapping (e.g. ``headers``) every value is secret.
    """
    extra = kwargs.pop("json_schema_extra", None) or {}
    if not isinstance(extra, dict):
        raise TypeError("secret_field takes json_schema_extra as a dict")
    return Field(default, json_schema_extra={**extra, **SECRET}, **kwargs)


MIN_SECRET = 4  # shorter values are not searched for in free text: they would match everywhere

# Keys whose values are secret even when no schema says so (third-party nodes, raw mappings).
_SECRET_KEY = re.compile(
    r"(?:^|[_\-])(?:pass|password|passwd|passphrase|password_hash|secret|token|api_?key|access_?key|"
    r"private_?key|credentials?|authorization|cookie)$",
    re.I,
)
_HEADERS_KEY = re.compile(r"^headers$", re.I)
_CREDENTIAL_HEADER = re.compile(r"auth|token|key|secret|cookie|pass|session|signature|credential", re.I)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_AUTH_SCHEME = re.compile(r"\b(Bearer|bearer|Basic|Digest)(\s+)[A-Za-z0-9._~+/=\-]+")
_WORDS = r"[A-Za-z_\-]*(?:password|passwd|secret|token|api[_\-]?key|access[_\-]?key|private[_\-]?key)"
# password=… (query strings, key=value logs) and "token": "…" (JSON quoted in text)
_PAIR = re.compile(rf"(?i)\b({_WORDS})(=)([^\s\"'&,;]+)")
_QUOTED_PAIR = re.compile(rf"(?i)(\"{_WORDS}\"\s*:\s*\")((?:[^\"\\]|\\.)+)(\")")

_lock = threading.Lock()
_known: set[str] = set()
_known_re: re.Pattern[str] | None = None


def remember(values: Iterable[str]) -> None:
    """Values that must never leave the process, searched for in every text :func:`redact_text` sees."""
    global _known_re
    new = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET} - _known
    if not new:
        return
    with _lock:
        _known.update(new)
        ordered = sorted(_known, key=len, reverse=True)
        _known_re = re.compile("|".join(re.escape(v) for v in ordered))


def _is_secret_field(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    extra = field.json_schema_extra if field is not None else None
    return isinstance(extra, dict) and bool(extra.get("secret"))


def secrets_of(value: Any) -> Iterator[str]:
    """Every secret string inside a config model (recursively): marked options, header values, URL passwords."""
    if isinstance(value, BaseModel):
        cls = type(value)
        for name in cls.model_fields:
            v = getattr(value, name, None)
            if _HEADERS_KEY.match(name) and isinstance(v, dict):
                # every header value is masked where headers are shown; searched for in free text
                # are only those of credential headers (not "application/json" everywhere)
                yield from (s for k, x in v.items() if _CREDENTIAL_HEADER.search(str(k)) for s in _strings(x))
            elif _is_secret_field(cls, name) or _SECRET_KEY.search(name):
                yield from _strings(v)
            else:
                yield from secrets_of(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from (_strings(v) if _SECRET_KEY.search(str(k)) else secrets_of(v))
    elif isinstance(value, list | tuple):
        for v in value:
            yield from secrets_of(v)
    elif isinstance(value, str) and "://" in value:
        parts = urlsplit(value) if _URL.fullmatch(value) else None
        if parts is not None and parts.password:
            yield parts.password


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
        if value.lower().startswith(("bearer ", "basic ", "token ")):
            yield value.split(None, 1)[1]
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def redact_url(url: str) -> str:
    """``url`` with its userinfo and every query value replaced by ``***`` (keys and the rest kept)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc and not parts.query:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if pairs:
            query = "&".join(f"{quote(k, safe='[]')}={MASK if v else ''}" for k, v in pairs)
        else:
            query = MASK
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _url_in_text(m: re.Match[str]) -> str:
    url = m.group(0)
    bare = url.rstrip(".,:;!?)]}")  # punctuation after a URL belongs to the sentence
    return redact_url(bare) + url[len(bare) :]


# What redact_text and redact gave for short texts and keys they saw: a console polled every
# second redacts the same node ids, states and messages each time. A text's entry holds the
# pattern of known secrets it was made with, so one remembered since is never missed; both are
# bounded (emptied when full).
_CACHED_TEXT = 128
_CACHE_SIZE = 1024
_texts: dict[str, tuple[Any, str]] = {}
_keys: dict[str, bool] = {}


def redact_text(text: str) -> str:
    """Free text (an error, a log line, a reason) with URLs, credentials and known secrets hidden."""
    if not text:
        return text
    known = _known_re
    cache = len(text) <= _CACHED_TEXT and type(text) is str
    if cache:
        hit = _texts.get(text)
        if hit is not None and hit[0] is known:
            return hit[1]
    out = _redact_text(text, known)
    if cache:
        if len(_texts) >= _CACHE_SIZE:
            _texts.clear()
        _texts[text] = (known, out)
    return out


def _redact_text(text: str, known: re.Pattern[str] | None) -> str:
    if known is not None:
        text = known.sub(MASK, text)
    if "://" in text:
        text = _URL.sub(_url_in_text, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    if "=" in text:
        text = _PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    if '"' in text:
        text = _QUOTED_PAIR.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    return text


def _secret_key(k: Any) -> bool:
    """Whether the values under ``k`` are secret by its name alone (``password``, ``token`` …)."""
    if type(k) is not str:
        return _SECRET_KEY.search(str(k)) is not None
    hit = _keys.get(k)
    if hit is None:
        hit = _SECRET_KEY.search(k) is not None
        if len(_keys) >= _CACHE_SIZE:
            _keys.clear()
        _keys[k] = hit
    return hit


def redact(value: Any, key: str = "") -> Any:
    """JSON-like data ready to leave the process: every string through :func:`redact_text`, and the
    values under secret-looking keys (``password``, ``token``, ``headers`` …) replaced by ``***``."""
    if isinstance(value, dict):
        if key and _HEADERS_KEY.match(key):
            return {k: _mask(v) for k, v in value.items()}
        out = {}
        for k, v in value.items():
            t = type(v)
            if _secret_key(k):
                out[k] = _mask(v)
            elif t is int or t is float or t is bool or v is None:
                out[k] = v  # what redact gives back unchanged, without the call
            elif t is str:
                out[k] = redact_text(v)
            else:
                out[k] = redact(v, str(k))
        return out
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_options(options: BaseModel) -> dict[str, Any]:
    """A config model as JSON with every option its schema marks secret hidden, then :func:`redact`."""
    data = options.model_dump(mode="json", exclude_none=True)
    return redact(_mask_marked(options, data))  # type: ignore[no-any-return]


def _mask_marked(model: BaseModel, data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    cls = type(model)
    out = dict(data)
    for name in cls.model_fields:
        if name not in out:
            continue
        if _is_secret_field(cls, name):
            out[name] = _mask(out[name])
            continue
        sub = getattr(model, name, None)
        if isinstance(sub, BaseModel):
            out[name] = _mask_marked(sub, out[name])
        elif isinstance(sub, dict) and isinstance(out[name], dict):
            out[name] = {
                k: _mask_marked(v, out[name][k]) if isinstance(v, BaseModel) and k in out[name] else out[name].get(k)
                for k, v in sub.items()
                if k in out[name]
            }
        elif isinstance(sub, list | tuple) and isinstance(out[name], list):
            out[name] = [
                _mask_marked(v, d) if isinstance(v, BaseModel) else d for v, d in zip(sub, out[name], strict=False)
            ]
    return out


def mask(value: Any) -> Any:
    """Every non-empty string in ``value`` (a string, or the values of a mapping or list) as ``***``."""
    return _mask(value)


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    if isinstance(value, str) and value:
        return MASK
    return value
