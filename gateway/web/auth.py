"""Console security: accounts, password hashing, sessions, CSRF/Origin checks, login throttling, API tokens.

Default on (``console.auth: true``). No default credentials: the first visit creates the admin
account with a one-time setup code printed in the gateway's log (or the accounts come from
``console.users`` with argon2 hashes). Sessions live in encrypted cookies (HttpOnly,
SameSite=Strict, Secure over TLS). Every state-changing request made with a session cookie
must carry the session's CSRF token in ``X-CSRF-Token`` and come from the console's own origin;
scripts use ``Authorization: Bearer <token>`` instead. ``/healthz`` (its status only; the details
need a session or token) and ``/metrics`` stay open for monitoring. The policy is in docs/security.md.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit, urlunsplit

from aiohttp import web

from ..config import ConsoleConfig
from ..errors import SluiceError
from .routes import ROUTES

__all__ = ["IDENTITY", "Auth", "Identity", "hash_password"]

log = logging.getLogger(__name__)

Role = Literal["viewer", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "admin")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_PASSWORD = 10
SESSION_MAX_AGE = 12 * 3600
COOKIE_NAME = "sluice_session"
CSRF_HEADER = "X-CSRF-Token"

# Who may reach a path comes from the route table's `roles`: `public` rows (monitoring, the
# login/setup pages and their API, shipped assets) are open, plus the favicon browsers ask for.
_OPEN_EXACT = frozenset({r.path for r in ROUTES if r.roles == "public" and "{" not in r.path} | {"/favicon.ico"})
_OPEN_PREFIX = tuple(r.path.split("{", 1)[0] for r in ROUTES if r.roles == "public" and "{" in r.path)
# `own` rows, pushed readings (nodes/http.py): each http source checks its own token, so neither the
# console's login nor its CSRF check applies; a device is no browser.
_OWN_AUTH_PREFIX = tuple(r.path.split("{", 1)[0] for r in ROUTES if r.roles == "own")
# `self` rows: a change any logged-in user may make to their own account (their password)
_SELF_EXACT = frozenset(r.path for r in ROUTES if r.roles == "self")
_LAST_ADMIN = "{name!r} is the last admin and cannot be {what}: make another user admin first"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")


@functools.cache
def _hasher() -> Any:
    # argon2 (and its cffi bindings) load at the first hash, not at import: a gateway with the
    # console's auth off never needs them.
    import argon2

    # OWASP's minimum for argon2id (19 MiB, 2 passes): affordable on a Pi, one hash at a time.
    return argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


@functools.cache
def _dummy_hash() -> str:
    # Made at the first login, not at import: a hash touches 19 MiB, which a gateway that is
    # never logged into should not carry as its peak resident size.
    return _hasher().hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    """An argon2id hash for ``console.users[].password_hash`` or the account file."""
    return _hasher().hash(password)


def _verify(stored: str, password: str) -> bool:
    import argon2.exceptions

    try:
        return _hasher().verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _bytes(text: str) -> bytes:
    # Headers and JSON may carry any code point, lone surrogates included: never an error, never equal
    # to an ASCII secret.
    return text.encode("utf-8", "surrogatepass")


def _equal(given: str, expected: str) -> bool:
    """A constant-time comparison that answers False, not TypeError, for non-ASCII input."""
    return hmac.compare_digest(_bytes(given), _bytes(expected))


def _token_digest(token: str) -> str:
    return hashlib.sha256(_bytes(token)).hexdigest()


@dataclass(slots=True, frozen=True)
class Identity:
    """Who is asking: a user by session, a script by API token, or anyone when auth is off."""

    name: str
    role: Role
    via: Literal["session", "token", "open"]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(slots=True)
class _User:
    name: str
    password_hash: str
    role: Role
    fixed: bool = False  # from console.users: cannot be changed through the console


@dataclass(slots=True)
class _Token:
    id: str
    name: str
    role: Role
    digest: str
    created: float
    last_used: float | None = None


class Session(dict[str, Any]):
    """The session's data, kept in an encrypted cookie (Fernet: AES-CBC + HMAC, with a timestamp)."""

    def __init__(self, data: dict[str, Any] | None = None, new: bool = True):
        super().__init__(data or {})
        self.new = new
        self.changed = False
        self.invalidated = False

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.changed = True

    def invalidate(self) -> None:
        self.clear()
        self.invalidated = True
        self.changed = True


SESSION = web.RequestKey("sluice_session", Session)
IDENTITY = web.RequestKey("sluice_identity", Identity)


async def get_session(request: web.Request) -> Session:
    return request[SESSION]


async def new_session(request: web.Request) -> Session:
    """Replace the request's session by an empty one (at login: no session fixation)."""
    s = Session()
    s.changed = True
    request[SESSION] = s
    return s


class AuthError(Exception):
    """A request the console refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class LoginThrottle:
    """Backoff after failed logins and setup codes that slows an attacker without locking out the owner.

    Failures are counted per client address (``ip:A``, any account), per account from one address
    (``user:U@A``) and per account from every address (``user:U``). Beyond a few free failures each
    further one doubles the wait before the next try (1 s, 2 s, 4 s … up to ``max_wait``), answered
    with 429 and Retry-After. The account-wide count slows only addresses that have themselves failed
    in the last ``window``: a correct password from an address that has not failed always gets in,
    so nobody can lock the owner out by failing on purpose. A success clears the account's counts;
    an address's own count fades after ``window`` without failures. Setup codes count per address only.
    Bounded: at most ``max_keys`` counters are remembered (the least recently failed forgotten first).
    """

    def __init__(
        self,
        free_address: int = 10,
        free_user: int = 5,
        free_account: int = 20,
        max_wait: float = 900.0,
        window: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ):
        self.free = {"ip": free_address, "user@": free_user, "user": free_account}
        self.max_wait = max_wait
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._fails: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (failures, last failure)

    @staticmethod
    def _keys(address: str, account: str | None) -> list[tuple[str, str]]:
        keys = [("ip", f"ip:{address}")]
        if account is not None:
            keys += [("user@", f"user:{account}@{address}"), ("user", f"user:{account}")]
        return keys

    def _count(self, key: str, now: float) -> tuple[int, float]:
        n, last = self._fails.get(key, (0, 0.0))
        return (0, 0.0) if n and now - last >= self.window else (n, last)

    def _until(self, kind: str, n: int, last: float) -> float:
        over = n - self.free[kind]
        return last + min(self.max_wait, 2.0 ** (over - 1)) if over > 0 else 0.0

    def retry_after(self, address: str, account: str | None = None) -> float:
        """Seconds this address must wait before trying ``account`` (or a setup code) again; 0 to go on."""
        now = self.clock()
        if self._count(f"ip:{address}", now)[0] == 0:
            return 0.0  # an address that has not failed is never slowed
        wait = 0.0
        for kind, key in self._keys(address, account):
            n, last = self._count(key, now)
            wait = max(wait, self._until(kind, n, last) - now)
        return wait

    def failure(self, address: str, account: str | None = None) -> None:
        now = self.clock()
        for kind, key in self._keys(address, account):
            n, _ = self._count(key, now)
            self._fails.pop(key, None)
            self._fails[key] = (n + 1, now)
            if n + 1 == self.free[kind] + 1:
                log.warning("console: failed logins (%s) are slowed from now on", key)
        while len(self._fails) > self.max_keys:
            self._fails.popitem(last=False)

    def success(self, address: str, account: str) -> None:
        self._fails.pop(f"user:{account}@{address}", None)
        self._fails.pop(f"user:{account}", None)


class UserStore:
    """Accounts and API tokens in ``<data_dir>/console/users.json`` (mode 0600), plus fixed config users."""

    def __init__(self, path: Path, fixed: list[Any]):
        self.path = path
        self.users: dict[str, _User] = {}
        self.tokens: dict[str, _Token] = {}
        # Per user name: bumped at logout, password or role change and removal; a session cookie
        # carries the number it was made under and is refused once it differs. Kept after a user
        # is removed, so that a new account of the same name does not revive old cookies.
        self.generations: dict[str, int] = {}
        self._fixed = {u.name: _User(u.name, u.password_hash, u.role, fixed=True) for u in fixed}
        self._load()

    def _load(self) -> None:
        self.users = dict(self._fixed)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # A damaged account file must not open the console to a new "first visit".
            raise SluiceError(
                f"console account file {self.path} is unreadable: {exc}; "
                "fix or remove it (removing it allows creating a new admin)"
            ) from None
        for u in data.get("users", []):
            if u["name"] not in self._fixed:
                self.users[u["name"]] = _User(u["name"], u["password_hash"], u["role"])
        for t in data.get("tokens", []):
            self.tokens[t["id"]] = _Token(**t)
        self.generations = {str(k): int(v) for k, v in data.get("sessions", {}).items()}

    def _dump(self) -> str:
        return json.dumps(
            {
                "users": [
                    {"name": u.name, "password_hash": u.password_hash, "role": u.role}
                    for u in self.users.values()
                    if not u.fixed
                ],
                "tokens": [asdict(t) for t in self.tokens.values()],
                "sessions": self.generations,
            },
            indent=1,
        )

    async def save(self) -> None:
        text = self._dump()
        await asyncio.to_thread(_write_private, self.path, text)

    def generation(self, name: str) -> int:
        return self.generations.get(name, 0)

    async def end_sessions(self, name: str) -> int:
        """End every session of ``name`` (saved before answering); returns the new generation."""
        self.generations[name] = self.generation(name) + 1
        await self.save()
        return self.generations[name]

    @property
    def needs_setup(self) -> bool:
        return not self.users

    def token_identity(self, token: str) -> Identity | None:
        digest = _token_digest(token)
        for t in self.tokens.values():
            if hmac.compare_digest(t.digest, digest):
                t.last_used = time.time()
                return Identity(t.name, t.role, "token")
        return None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _secret_key(path: Path) -> bytes:
    """The cookie encryption key, kept across restarts so sessions survive them."""
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        log.warning("console secret %s has the wrong length; making a new one (sessions end)", path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def _host_name(host: str) -> str | None:
    """The name (or address) in a ``Host`` header, lower-cased and without its port; None if malformed."""
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep:
            return None
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
        rest = ":" + port
    else:
        name, rest = host, ""
    if not name or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
        return None
    return name.lower()


def host_allowed(host: str, names: frozenset[str], any_address: bool = False) -> bool:
    """Whether a request's ``Host`` is one this console answers to: a loopback address (or with
    ``any_address``, any IP address), or exactly one of ``names``.

    Matched whole, never by prefix: ``127.0.0.1.nip.io`` is a name an attacker controls, and DNS
    rebinding needs a name, so an address written as such is never one.
    """
    name = _host_name(host)
    if name is None:
        return False
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return name in names
    return any_address or ip.is_loopback or name in names


def safe_next(value: object, origin: str) -> str:
    """Where to go after login: ``value`` resolved against the console's ``origin`` if it stays on it
    (path, query and fragment), else ``/``.

    Browsers read a backslash as ``/`` and drop tabs and newlines inside URLs, so ``/\\host/page``,
    ``/<tab>/host`` and ``//host`` all name another origin: such values are refused before resolving.
    """
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//"):
        return "/"
    if "\\" in value or any(ord(c) < 0x21 or c == "\x7f" for c in value):
        return "/"
    target = urlsplit(urljoin(origin.rstrip("/") + "/", value))
    here = urlsplit(origin)
    if (target.scheme, target.netloc) != (here.scheme, here.netloc) or not target.path.startswith("/"):
        return "/"
    if target.path.startswith("//"):
        return "/"
    return urlunsplit(("", "", target.path, target.query, target.fragment))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _same_origin(request: web.Request, value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme == request.scheme and parts.netloc == request.host


class Auth:
    """The console's gatekeeper: installed by :func:`gateway.web.setup` on the console's app."""

    def __init__(self, cfg: ConsoleConfig, data_dir: Path, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.enabled = cfg.auth
        self.tls = bool(cfg.tls_cert)
        self.store = UserStore(data_dir / "console" / "users.json", cfg.users)
        self.throttle = LoginThrottle(clock=clock)
        self._secret_path = data_dir / "console" / "secret.key"
        # Only one argon2 computation at a time: each holds 19 MiB.
        self._hashing = asyncio.Semaphore(1)
        # Bound to loopback, only loopback addresses, localhost and the configured names may be asked
        # for: a page whose domain an attacker re-points at 127.0.0.1 (DNS rebinding) is refused
        # before anything else. Bound elsewhere, the check applies once names are configured.
        self.host_names = frozenset({"localhost", cfg.host.lower(), *(h.lower() for h in cfg.allowed_hosts)})
        self.loopback_only = _is_loopback(cfg.host)
        self.check_host = self.loopback_only or bool(cfg.allowed_hosts)
        self.sessions_ended: list[Callable[[str], Awaitable[None]]] = []  # e.g. close live sockets
        self.setup_code: str | None = None
        if self.enabled and self.store.needs_setup:
            self.setup_code = f"{secrets.randbelow(10**4):04d}-{secrets.randbelow(10**4):04d}"

    def install(self, app: web.Application) -> None:
        self._key = base64.urlsafe_b64encode(_secret_key(self._secret_path))  # made (or read) now: errors show at start
        self._cipher: Any = None
        app.middlewares.append(self.sessions)
        app.middlewares.append(self.middleware)

    def _fernet(self) -> Any:
        """The session cookie cipher, built on the first cookie: a console nobody opens (or one
        without auth, which sets no cookie) never loads the crypto library (~7 MiB)."""
        if self._cipher is None:
            from cryptography.fernet import Fernet

            self._cipher = Fernet(self._key)
        return self._cipher

    def _load_session(self, request: web.Request) -> Session:
        token = request.cookies.get(COOKIE_NAME)
        if token:
            from cryptography.fernet import InvalidToken

            try:
                data = json.loads(self._fernet().decrypt(token.encode(), ttl=SESSION_MAX_AGE))
                if isinstance(data, dict):
                    return Session(data, new=False)
            except (InvalidToken, ValueError):
                pass  # expired, forged, or from before a key change: start afresh
        return Session()

    @web.middleware
    async def sessions(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[SESSION] = self._load_session(request)
        response = await handler(request)
        session = request[SESSION]
        if session.changed and not response.prepared:
            if session.invalidated and not session:
                response.del_cookie(COOKIE_NAME, path="/")
            else:
                token = self._fernet().encrypt(json.dumps(dict(session)).encode()).decode()
                response.set_cookie(
                    COOKIE_NAME,
                    token,
                    max_age=SESSION_MAX_AGE,
                    path="/",
                    httponly=True,
                    samesite="Strict",
                    secure=self.tls,
                )
        return response

    def announce(self, url: str) -> None:
        if self.setup_code is not None:
            log.warning(
                "console: no account yet; open %ssetup and create the admin with setup code %s", url, self.setup_code
            )

    async def end_sessions(self, name: str) -> None:
        """End every session of ``name``, saved before anything is answered, and tell the listeners."""
        await self.store.end_sessions(name)
        for listener in self.sessions_ended:
            await listener(name)

    # --- hashing off the event loop --------------------------------------------------------

    async def _verify(self, stored: str, password: str) -> bool:
        async with self._hashing:
            return await asyncio.to_thread(_verify, stored, password)

    async def _hash(self, password: str) -> str:
        async with self._hashing:
            return await asyncio.to_thread(hash_password, password)

    # --- request checks -------------------------------------------------------------------

    @staticmethod
    def check_origin(request: web.Request, required: bool) -> None:
        """Refuse a request whose Origin (or Referer) is another site; ``required``: refuse when neither is sent."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null":
            if not _same_origin(request, origin):
                raise AuthError(403, f"cross-origin request refused (Origin {origin})")
            return
        if origin == "null":
            raise AuthError(403, "cross-origin request refused (Origin null)")
        referer = request.headers.get("Referer")
        if referer:
            if not _same_origin(request, referer):
                raise AuthError(403, "cross-origin request refused (Referer)")
            return
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise AuthError(403, f"cross-origin request refused (Sec-Fetch-Site {site})")
        if required:
            raise AuthError(403, "request without Origin refused")

    async def _check_csrf(self, request: web.Request, given: str | None) -> None:
        session = await get_session(request)
        expected = session.get("csrf")
        if not expected or not given or not _equal(given, str(expected)):
            raise AuthError(403, "missing or wrong CSRF token (send the X-CSRF-Token from /api/session)")

    async def identify(self, request: web.Request) -> Identity | None:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError(401, "Authorization must be 'Bearer <api token>'")
            ident = self.store.token_identity(token.strip())
            if ident is None:
                raise AuthError(401, "unknown or revoked API token")
            return ident
        if not self.enabled:
            return Identity("anonymous", "admin", "open")
        session = await get_session(request)
        name = session.get("user")
        if not name:
            return None
        user = self.store.users.get(name)
        if user is None or session.get("gen", 0) != self.store.generation(name):
            # deleted since, or logged out, or its password or role changed: the session has ended
            # (its CSRF token stays, so that the page it came from can log in again)
            csrf = session.get("csrf")
            session.invalidate()
            if csrf:
                session["csrf"] = csrf
            return None
        return Identity(user.name, user.role, "session")

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if self.check_host and not host_allowed(request.host, self.host_names, not self.loopback_only):
            where = "localhost only" if self.loopback_only else "its addresses and configured names only"
            return web.json_response(
                {"error": f"the console answers to {where}, not {request.host!r} (see console.allowed_hosts)"},
                status=421,
            )
        if path.startswith(_OWN_AUTH_PREFIX):
            return await handler(request)
        try:
            ident = await self.identify(request)
            request[IDENTITY] = ident
            if request.method not in SAFE_METHODS and (ident is None or ident.via != "token"):
                # A browser can be made to send our cookie from another site: the Origin tells, the
                # CSRF token (only readable by our own pages) proves it.
                self.check_origin(request, required=False)
                if self.enabled:
                    await self._check_csrf(request, request.headers.get(CSRF_HEADER))
            if path in _OPEN_EXACT or path.startswith(_OPEN_PREFIX):
                return await handler(request)
            if ident is None:
                if path.startswith("/api/") or path == "/ws" or request.method not in SAFE_METHODS:
                    raise AuthError(401, "log in or send an API token")
                raise web.HTTPFound("/setup" if self.store.needs_setup else "/login")
            if request.method not in SAFE_METHODS and not ident.is_admin and path not in _SELF_EXACT:
                raise AuthError(403, f"{ident.name} is a viewer: this needs the admin role")
        except AuthError as exc:
            headers = {"Retry-After": str(int(exc.retry_after) + 1)} if exc.retry_after else None
            if exc.status == 401:
                headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="sluice"'}
            return web.json_response({"error": exc.message}, status=exc.status, headers=headers)
        return await handler(request)

    async def check_ws(self, request: web.Request) -> None:
        """The WebSocket handshake: same origin always for browsers, and the CSRF token in ``?csrf=``."""
        ident: Identity | None = request.get(IDENTITY)
        if ident is not None and ident.via == "token":
            return
        if "Origin" in request.headers:
            self.check_origin(request, required=True)
        elif ident is None or ident.via == "session":
            raise AuthError(403, "WebSocket without Origin refused")
        if self.enabled:
            await self._check_csrf(request, request.query.get("csrf"))

    # --- handlers ---------------------------------------------------------------------------

    async def api_session(self, request: web.Request) -> web.Response:
        """Who am I, and the CSRF token my page must send with every change."""
        session = await get_session(request)
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(32)
        ident: Identity | None = request.get(IDENTITY)
        return web.json_response(
            {
                "auth": self.enabled,
                "user": ident.name if ident else None,
                "role": ident.role if ident else None,
                "csrf": session["csrf"],
                "needs_setup": self.enabled and self.store.needs_setup,
            }
        )

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise AuthError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise AuthError(400, "the body must be a JSON object")
        return body

    async def _start_session(self, request: web.Request, user: _User) -> dict[str, Any]:
        # A fresh session at login: a cookie planted before login never becomes an authenticated one.
        session = await new_session(request)
        session["user"] = user.name
        session["gen"] = self.store.generation(user.name)
        session["csrf"] = secrets.token_urlsafe(32)
        return {"user": user.name, "role": user.role, "csrf": session["csrf"]}

    async def api_login(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            name, password = str(body.get("name", "")), str(body.get("password", ""))
            address, account = str(request.remote), name.lower()
            wait = self.throttle.retry_after(address, account)
            if wait > 0:
                raise AuthError(429, f"too many failed logins; try again in {int(wait) + 1}s", retry_after=wait)
            user = self.store.users.get(name)
            # An unknown name costs the same time as a wrong password: no probing for names.
            ok = await self._verify(user.password_hash if user else _dummy_hash(), password)
            if not ok or user is None:
                self.throttle.failure(address, account)
                log.info("console: failed login for %r from %s", name[:64], request.remote)
                raise AuthError(401, "wrong user name or password")
            self.throttle.success(address, account)
            log.info("console: %s logged in from %s", user.name, request.remote)
            answer = await self._start_session(request, user)
            answer["next"] = safe_next(body.get("next"), f"{request.scheme}://{request.host}")
            return web.json_response(answer)
        except AuthError as exc:
            headers = {"Retry-After": str(int(exc.retry_after) + 1)} if exc.retry_after else None
            return web.json_response({"error": exc.message}, status=exc.status, headers=headers)

    async def api_logout(self, request: web.Request) -> web.Response:
        """End the session here and every other session of the same user (a copied cookie too)."""
        ident: Identity | None = request.get(IDENTITY)
        session = await get_session(request)
        session.invalidate()
        if ident is not None and ident.via == "session":
            await self.end_sessions(ident.name)
            log.info("console: %s logged out (all their sessions ended)", ident.name)
        return web.json_response({"ok": True})

    def _check_new_user(self, body: dict[str, Any]) -> tuple[str, str, Role]:
        name, password, role = str(body.get("name", "")), str(body.get("password", "")), body.get("role", "viewer")
        if not _NAME.fullmatch(name):
            raise AuthError(400, "name: letters, digits, _ and -, starting with a letter (at most 64)")
        if len(password) < MIN_PASSWORD:
            raise AuthError(400, f"password: at least {MIN_PASSWORD} characters")
        if role not in ROLES:
            raise AuthError(400, f"role: one of {', '.join(ROLES)}")
        return name, password, role

    async def api_setup(self, request: web.Request) -> web.Response:
        """First visit: create the admin account (needs the setup code from the gateway's log)."""
        try:
            if not self.enabled or not self.store.needs_setup:
                raise AuthError(409, "the console already has accounts; log in")
            body = await self._json(request)
            address = str(request.remote)
            wait = self.throttle.retry_after(address)
            if wait > 0:
                raise AuthError(429, f"too many wrong setup codes; try again in {int(wait) + 1}s", retry_after=wait)
            code = str(body.get("code", "")).strip()
            if self.setup_code is None or not _equal(code, self.setup_code):
                self.throttle.failure(address)
                raise AuthError(403, "wrong setup code (the gateway's log shows it)")
            name, password, _ = self._check_new_user({**body, "role": "admin"})
            user = _User(name, await self._hash(password), "admin")
            if not self.store.needs_setup:  # someone else finished first while we hashed
                raise AuthError(409, "the console already has accounts; log in")
            self.store.users[name] = user
            await self.store.save()
            self.setup_code = None
            log.warning("console: admin account %r created from %s", name, request.remote)
            return web.json_response(await self._start_session(request, user), status=201)
        except AuthError as exc:
            headers = {"Retry-After": str(int(exc.retry_after) + 1)} if exc.retry_after else None
            return web.json_response({"error": exc.message}, status=exc.status, headers=headers)

    def _admin(self, request: web.Request) -> Identity:
        ident: Identity | None = request.get(IDENTITY)
        if ident is None or not ident.is_admin:
            raise web.HTTPForbidden(
                text=json.dumps({"error": "this needs the admin role"}), content_type="application/json"
            )
        return ident

    def _last_admin(self, user: _User) -> bool:
        """Whether ``user`` is the only admin account: removing it or making it a viewer would leave
        the console with nobody who can manage it (an admin API token is no account to log in with)."""
        return user.role == "admin" and not any(
            u.role == "admin" for u in self.store.users.values() if u.name != user.name
        )

    async def api_users(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(
            {
                "users": [
                    {"name": u.name, "role": u.role, "fixed": u.fixed, "last_admin": self._last_admin(u)}
                    for u in self.store.users.values()
                ]
            }
        )

    async def api_user_create(self, request: web.Request) -> web.Response:
        self._admin(request)
        try:
            body = await self._json(request)
            name, password, role = self._check_new_user(body)
            if name in self.store.users:
                raise AuthError(409, f"user {name!r} exists")
        except AuthError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        self.store.users[name] = _User(name, await self._hash(password), role)
        await self.store.save()
        log.info("console: user %r (%s) created by %s", name, role, request[IDENTITY].name)
        return web.json_response({"name": name, "role": role}, status=201)

    async def api_user_delete(self, request: web.Request) -> web.Response:
        ident = self._admin(request)
        name = request.match_info["name"]
        user = self.store.users.get(name)
        if user is None:
            return web.json_response({"error": f"no user {name!r}"}, status=404)
        if user.fixed:
            return web.json_response({"error": f"{name!r} comes from console.users in the config"}, status=409)
        if name == ident.name:
            return web.json_response({"error": "you cannot delete your own account"}, status=409)
        if self._last_admin(user):
            return web.json_response({"error": _LAST_ADMIN.format(name=name, what="removed")}, status=409)
        del self.store.users[name]
        await self.end_sessions(name)
        log.info("console: user %r removed by %s", name, ident.name)
        return web.json_response({"ok": True})

    async def api_user_change(self, request: web.Request) -> web.Response:
        """``PATCH /api/users/<name> {"role": ..., "password": ...}`` (admin): every session of that
        user ends; an admin changing their own account keeps only the session that asked.

        A session's own password is not changed here: that route asks for the current one (a
        session left open in a browser must not be enough to take the account). An admin API token
        is no account, so every account, whatever its name, is another's to it."""
        ident = self._admin(request)
        name = request.match_info["name"]
        own = ident.via == "session" and name == ident.name
        user = self.store.users.get(name)
        try:
            if user is None:
                raise AuthError(404, f"no user {name!r}")
            if user.fixed:
                raise AuthError(409, f"{name!r} comes from console.users in the config")
            body = await self._json(request)
            if "role" not in body and "password" not in body:
                raise AuthError(400, 'give "role", "password" or both')
            role, password = body.get("role", user.role), body.get("password")
            if role not in ROLES:
                raise AuthError(400, f"role: one of {', '.join(ROLES)}")
            if password is not None and own:
                raise AuthError(
                    409, "change your own password with POST /api/session/password, which asks for the current one"
                )
            if password is not None and (not isinstance(password, str) or len(password) < MIN_PASSWORD):
                raise AuthError(400, f"password: at least {MIN_PASSWORD} characters")
            if own and role != "admin":
                raise AuthError(409, "you cannot take the admin role from yourself")
            if role != "admin" and self._last_admin(user):
                raise AuthError(409, _LAST_ADMIN.format(name=name, what="made a viewer"))
        except AuthError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        if password is not None:
            user.password_hash = await self._hash(password)
        user.role = role
        await self.end_sessions(name)  # saves the account file too
        what = f"role {role}" + (" and a new password" if password is not None else "")
        log.warning("console: user %r given %s by %s; their sessions ended", name, what, ident.name)
        answer: dict[str, Any] = {"name": name, "role": role}
        if own:
            answer.update(await self._start_session(request, user))
        return web.json_response(answer)

    async def api_own_password(self, request: web.Request) -> web.Response:
        """``POST /api/session/password {"current": ..., "password": ...}``: any logged-in user changes
        their own password. The current one is asked (a session left open in a browser is not
        enough to take the account) and wrong guesses are slowed like failed logins. Every other
        session of the user ends; this one goes on with a new CSRF token."""
        ident: Identity | None = request.get(IDENTITY)
        try:
            if ident is None or ident.via != "session":
                raise AuthError(
                    409,
                    "only a logged-in user has a password to change (not an API token, nor a console without login)",
                )
            user = self.store.users.get(ident.name)
            if user is None:
                raise AuthError(401, "log in again")
            if user.fixed:
                raise AuthError(
                    409,
                    f"{user.name!r} comes from console.users in the config: change its "
                    "password_hash there (sluice hash-password)",
                )
            body = await self._json(request)
            current, password = body.get("current"), body.get("password")
            if not isinstance(current, str) or not isinstance(password, str):
                raise AuthError(400, 'give "current" (your password now) and "password" (the new one)')
            if len(password) < MIN_PASSWORD:
                raise AuthError(400, f"password: at least {MIN_PASSWORD} characters")
            address, account = str(request.remote), user.name.lower()
            wait = self.throttle.retry_after(address, account)
            if wait > 0:
                raise AuthError(429, f"too many wrong passwords; try again in {int(wait) + 1}s", retry_after=wait)
            if not await self._verify(user.password_hash, current):
                self.throttle.failure(address, account)
                log.info("console: wrong current password for %r from %s", user.name, request.remote)
                raise AuthError(403, "the current password is wrong")
            self.throttle.success(address, account)
        except AuthError as exc:
            headers = {"Retry-After": str(int(exc.retry_after) + 1)} if exc.retry_after else None
            return web.json_response({"error": exc.message}, status=exc.status, headers=headers)
        user.password_hash = await self._hash(password)
        await self.end_sessions(user.name)  # saves the account file too
        log.warning("console: %s changed their password from %s; their other sessions ended", user.name, request.remote)
        return web.json_response(await self._start_session(request, user))

    async def api_tokens(self, request: web.Request) -> web.Response:
        self._admin(request)
        return web.json_response(
            {
                "tokens": [
                    {"id": t.id, "name": t.name, "role": t.role, "created": t.created, "last_used": t.last_used}
                    for t in self.store.tokens.values()
                ]
            }
        )

    async def api_token_create(self, request: web.Request) -> web.Response:
        """A new API token; the token itself is shown once and stored only as a hash."""
        self._admin(request)
        try:
            body = await self._json(request)
        except AuthError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        name = str(body.get("name", "script"))[:64]
        role = body.get("role", "viewer")
        if role not in ROLES:
            return web.json_response({"error": f"role: one of {', '.join(ROLES)}"}, status=400)
        token = "slt_" + secrets.token_urlsafe(32)
        t = _Token(secrets.token_hex(6), name, role, _token_digest(token), time.time())
        self.store.tokens[t.id] = t
        await self.store.save()
        return web.json_response({"id": t.id, "name": name, "role": role, "token": token}, status=201)

    async def api_token_delete(self, request: web.Request) -> web.Response:
        self._admin(request)
        if self.store.tokens.pop(request.match_info["id"], None) is None:
            return web.json_response({"error": "no such token"}, status=404)
        await self.store.save()
        return web.json_response({"ok": True})
