"""OpenSSL in ``sluice run``: loaded at its first import by default, kept out with ``SLUICE_TLS=auto``.

Python's ``ssl`` and ``_hashlib`` modules map OpenSSL (libssl and libcrypto) into the process,
and asyncio imports ``ssl`` when it is imported itself: about 4.5 MiB of resident memory that a
gateway talking plain MQTT on its own network never uses. ``sluice run`` reads its config file
before anything imports asyncio. When nothing in it (or in the environment variables it names)
could ask for TLS:

- by default (:func:`deferred_openssl`), asyncio, pydantic and the runtime are imported as on a
  Python without OpenSSL, and nothing is taken away: the first ``import ssl`` later (a node or
  connection added by a reload, the console's web stack, ``/metrics``) loads it and hands it to
  asyncio, and ``hashlib``/``hmac`` imported after start-up use it as usual;
- with ``SLUICE_TLS=auto`` (:func:`keep_out_unless_needed`), ``ssl``, ``_ssl`` and ``_hashlib``
  are refused for the life of the process: asyncio, ``hashlib`` and ``hmac`` work on (``hashlib``
  with Python's own SHA-2 and BLAKE2); a request for TLS gets an ImportError that says why, the
  node types whose libraries import ``ssl`` (Kafka, Redis, Modbus, serial, WebSocket, plug-ins)
  are shown in the editor's palette as needing a restart, ``/metrics`` answers 503, and a live reload that adds TLS
  asks for a restart. Even the console's web stack then loads without OpenSSL;
- with ``SLUICE_TLS=1`` it loads at start, as in any Python program.

The test is on the text, before validation, so it errs on the side of loading: any mention of
``tls``, ``ssl``, ``https``, ``wss``, ``mqtts``, ``rediss``, ``sasl``, ``cert``, ``ca_file`` or
``key_file`` anywhere (a comment too) loads OpenSSL, and so does a ``${VAR}`` whose value or
default holds one (``tls: false`` alone does not); so does any ``type:`` that is not one of the
built-in node, connection and LLM provider types known to import without OpenSSL
(:data:`LEAN_TYPES`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = [
    "blocked",
    "config_may_use_tls",
    "deferred",
    "deferred_openssl",
    "keep_out_unless_needed",
    "nodes_may_use_tls",
    "refused",
]

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


class _KeepOut:
    """Refuses OpenSSL's modules with an ImportError that says why (a meta path finder; not
    derived from importlib.abc's, whose import brings importlib.resources, tempfile and shutil)."""

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


# --- the default: OpenSSL loaded when first imported, not at start ---------------------------

# asyncio's modules that import ``ssl`` in a ``try`` and run on ``ssl = None`` without it (the same
# in CPython 3.11 to 3.13); sslproto also derives ``SSLAgainErrors`` from it at import.
_ASYNCIO_SSL = ("asyncio.base_events", "asyncio.selector_events", "asyncio.sslproto")
# the modules that take Python's own digests when ``_hashlib`` is missing, and the name they keep it under
_HASH_USERS = (("hashlib", "_hashlib"), ("hmac", "_hashopenssl"))

_deferred = False


def deferred() -> bool:
    """True when asyncio was imported without ``ssl`` and gets it at its first import."""
    return _deferred


def _hand_to_asyncio(ssl: ModuleType) -> None:
    """Give asyncio's modules the ``ssl`` module they were imported without."""
    for name in _ASYNCIO_SSL:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "ssl", False) is None:
            mod.ssl = ssl  # type: ignore[attr-defined]
    sslproto = sys.modules.get("asyncio.sslproto")
    if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
        sslproto.SSLAgainErrors = (ssl.SSLWantReadError, ssl.SSLSyscallError)  # type: ignore[attr-defined]


class _ThenAsyncio:
    """``ssl``'s own loader, which then hands the module to asyncio (:func:`_hand_to_asyncio`)."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _hand_to_asyncio(module)


class _WhenImported:
    """Finds ``ssl`` as the other finders do, with a loader that also hands it to asyncio."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> ModuleSpec | None:
        if fullname != "ssl":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec("ssl")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenAsyncio(spec.loader)  # type: ignore[assignment]
        return spec


@contextlib.contextmanager
def deferred_openssl(config_text: str, environ: Mapping[str, str] | None = None) -> Iterator[bool]:
    """Without ``SLUICE_TLS``, what is imported inside takes no OpenSSL, when the config may not
    use TLS; yields True if so. Enter before anything imports asyncio.

    asyncio imports ``ssl`` as it is imported itself, and pydantic imports ``secrets``, which
    imports ``hmac`` and ``hashlib``, which load ``_hashlib``: together libssl and libcrypto,
    about 4.5 MiB resident in a gateway on plain MQTT that never calls them. Inside, ``ssl`` and
    ``_hashlib`` import as on a Python without OpenSSL, and so asyncio runs on ``ssl = None`` and
    ``hashlib``/``hmac`` on Python's own digests. On the way out nothing stays changed: the first
    ``import ssl`` anywhere later (a TLS connection added by a reload, the console's web stack,
    ``/metrics``, a Kafka node) loads OpenSSL as usual and hands it to asyncio's modules, which
    then make TLS connections as ever; ``hashlib`` and ``hmac`` are dropped from ``sys.modules``,
    so the next import of either loads them with OpenSSL (what was imported inside keeps its
    copies: ``secrets.compare_digest``). ``SLUICE_TLS=1`` loads OpenSSL at start,
    ``SLUICE_TLS=auto`` keeps it out (:func:`keep_out_unless_needed`)."""
    global _deferred
    env = os.environ if environ is None else environ
    if (
        _finder is not None
        or env.get(ENV_VAR, "").strip()
        or config_may_use_tls(config_text, env)
        or any(name in sys.modules for name in ("asyncio", "ssl", "_ssl", "_hashlib", "hashlib", "hmac"))
    ):
        yield False
        return
    sys.modules["ssl"] = sys.modules["_hashlib"] = None  # type: ignore[assignment]  # `try: import ssl` …
    try:
        yield True
    finally:
        for name in ("ssl", "_hashlib"):
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        for name, attr in _HASH_USERS:
            if name in sys.modules and getattr(sys.modules[name], attr, False) is None:
                del sys.modules[name]
        without = [name for name in _ASYNCIO_SSL if getattr(sys.modules.get(name), "ssl", False) is None]
        if without == list(_ASYNCIO_SSL):
            _deferred = True
            sys.meta_path.insert(0, _WhenImported())
        elif without:  # an asyncio of another shape: load it now, as without this
            import ssl

            _hand_to_asyncio(ssl)
