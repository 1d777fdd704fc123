"""OpenSSL only for a gateway whose config uses TLS, when asked: ``SLUICE_TLS=auto``.

Python's ``ssl`` and ``_hashlib`` modules map OpenSSL (libssl and libcrypto) into the process,
and asyncio imports ``ssl`` when it is imported itself: about 5 MiB of resident memory that a
gateway talking plain MQTT on its own network never uses. With ``SLUICE_TLS=auto`` in its
environment, ``sluice run`` reads its config file before anything imports asyncio; when nothing in
it (or in the environment variables it names) could ask for TLS, it stops ``ssl``, ``_ssl`` and
``_hashlib`` from loading for the life of the process. asyncio, ``hashlib`` and ``hmac`` are
written for a Python without OpenSSL and work on (``hashlib`` with Python's own SHA-2 and BLAKE2);
a request for TLS anyway gets an ImportError that says why.

It is not the default: such a process cannot offer what needs OpenSSL until it restarts — the
node types whose libraries import ``ssl`` (Kafka, Redis, Modbus, serial, WebSocket, plug-ins) are
missing from the editor's palette, ``/metrics`` (prometheus_client imports ``ssl``) answers 503,
and a live reload that adds TLS asks for a restart. It suits an appliance whose config is fixed.

The test is on the text, before validation, so it errs on the side of loading: any mention of
``tls``, ``ssl``, ``https``, ``wss``, ``mqtts``, ``rediss``, ``sasl``, ``cert``, ``ca_file`` or
``key_file`` anywhere (a comment too) loads OpenSSL, and so does a ``${VAR}`` whose value or
default holds one (``tls: false`` alone does not); so does any ``type:`` that is not one of the
built-in node, connection and LLM provider types known to import without OpenSSL
(:data:`LEAN_TYPES`).
"""

from __future__ import annotations

import importlib.abc
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["blocked", "config_may_use_tls", "keep_out_unless_needed", "nodes_may_use_tls", "refused"]

# OpenSSL's Python modules: ssl needs _ssl (libssl + libcrypto); hashlib and hmac use _hashlib
# (libcrypto) when it is there and Python's own digests when it is not.
_MODULES = ("ssl", "_ssl", "_hashlib")

_WORDS = re.compile(r"tls|ssl|https|wss|mqtts|rediss|sasl|cert|ca_file|key_file", re.IGNORECASE)
_OFF = re.compile(r"\btls(?:_insecure)?\s*:\s*(?:false|no|off)\b", re.IGNORECASE)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
_TYPE = re.compile(r"\btype\s*:\s*[\"']?([^\s,}\"'#]*)")

# Types whose modules (and libraries) import without OpenSSL; tests/gateway/test_tls_lazy.py
# checks each of them. Anything else in a config lets OpenSSL load.
LEAN_TYPES = frozenset(
    {
        # nodes
        # (not redis, redis_out, lookup: redis-py 8 reads ssl.VerifyMode as it is imported)
        "alert", "console", "ewma", "filter", "flatline", "history", "homeassistant", "http", "http_poll",
        "llm", "log", "map", "mqtt", "mqtt_out", "rate_of_change",
        "simulate", "stale", "threshold", "webhook", "window", "zscore",
        # LLM providers (a remote one's https URL counts by itself)
        "local", "remote",
    }
)  # fmt: skip

ENV_VAR = "SLUICE_TLS"


def config_may_use_tls(text: str, environ: Mapping[str, str]) -> bool:
    """True unless nothing in the config text (or the variables it substitutes) could ask for TLS."""
    if _WORDS.search(_OFF.sub("", text)):
        return True
    if any(t not in LEAN_TYPES for t in _TYPE.findall(text)):
        return True
    return any(_WORDS.search(environ.get(name, "")) for name in _ENV.findall(text))


_TLS_URL = re.compile(r"^(?:https|wss|mqtts|rediss|ssl)://", re.IGNORECASE)
_TLS_FIELDS = ("tls", "ca_file", "cert_file", "key_file", "sasl_mechanism")


def _holds_tls(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_TLS_URL.match(value))
    if isinstance(value, dict):
        return any((k in _TLS_FIELDS and bool(v)) or _holds_tls(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_tls(v) for v in value)
    return False


def nodes_may_use_tls(options: Iterable[Any]) -> bool:
    """True when a node (validated options, as a running gateway holds them) may use TLS: a
    type outside :data:`LEAN_TYPES`, a TLS field set, or a URL of a TLS scheme in any option.
    Unlike :func:`config_may_use_tls` a comment or a file name cannot make it say yes."""
    for o in options:
        if o.type not in LEAN_TYPES or _holds_tls(o.model_dump(mode="json")):
            return True
    return False


class _KeepOut(importlib.abc.MetaPathFinder):
    """Refuses OpenSSL's modules with an ImportError that says why."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> None:
        if fullname in _MODULES:
            raise ModuleNotFoundError(
                f"TLS ({fullname}) was not loaded: {ENV_VAR}=auto and nothing in this gateway's config "
                f"asked for it when it started (no tls, ca_file, https, rediss or sasl). Restart the "
                f"gateway after adding it to the config, or without {ENV_VAR}=auto",
                name=fullname,
            )
        return None


_finder: _KeepOut | None = None


def refused(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is this module refusing one of OpenSSL's modules."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name in _MODULES and _finder is not None:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def blocked() -> bool:
    """True when this process keeps OpenSSL out (see :func:`keep_out_unless_needed`)."""
    return _finder is not None


def keep_out_unless_needed(config_text: str, environ: Mapping[str, str] | None = None) -> bool:
    """With ``SLUICE_TLS=auto``, keep OpenSSL out of this process unless the config may use TLS;
    True if kept out.

    Call before asyncio (or anything else that imports ``ssl``) is imported: a module already
    loaded stays, and then nothing is kept out."""
    global _finder
    env = os.environ if environ is None else environ
    if _finder is not None:
        return True
    if env.get(ENV_VAR, "").strip().lower() != "auto" or config_may_use_tls(config_text, env):
        return False
    if any(name in sys.modules for name in _MODULES):
        return False
    _finder = _KeepOut()
    sys.meta_path.insert(0, _finder)
    return True
