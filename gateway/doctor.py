"""``sluice doctor``: check a gateway's config, connections, devices, disk, databases, clock and console.

Every check says what it found in words a technician can act on. The exit code is 0 when all is
well, 1 with warnings, 2 with errors; ``--json`` prints the same for scripts. Nothing here changes
anything: databases are opened read-only, and brokers get a connect and a clean disconnect.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import grp
import json
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from ._migrate import known_schemas, read_version
from .config import LoadedConfig, MqttConnection, load_config
from .errors import ConfigError
from .redact import redact_url

__all__ = ["Check", "main", "run_doctor"]

OK, WARN, ERROR = "ok", "warning", "error"
LEVELS = {OK: 0, WARN: 1, ERROR: 2}
MARK = {OK: "ok  ", WARN: "WARN", ERROR: "FAIL"}
TIMEOUT = 5.0
# below these the gateway soon cannot write its state and outbox
FREE_ERROR_BYTES = 50 * 2**20
FREE_WARN_BYTES = 500 * 2**20
OUTBOX_WARN_ROWS = 10_000
SERVICE_USER = "sluice"


@dataclass
class Check:
    area: str
    level: str
    message: str
    hint: str = ""


def _plain(exc: BaseException) -> str:
    """An exception in words: what a technician can check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate is not trusted ({exc.verify_message}): check ca_file and the host name"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer within 5 s: wrong address, the device is off, or a firewall drops the traffic"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: the machine answers but nothing listens on that port (service not running?)"
    if isinstance(exc, socket.gaierror):
        return "the name does not resolve: check the spelling and the gateway's DNS"
    if isinstance(exc, OSError) and exc.errno in (101, 113):
        return "no route to the host: check the network cable, Wi-Fi or VPN"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --- the checks -----------------------------------------------------------------------------------


def check_config(path: Path) -> tuple[list[Check], LoadedConfig | None]:
    if not path.exists():
        return [Check("config", ERROR, f"{path} does not exist", "install writes one; or pass the right path")], None
    try:
        loaded = load_config(path)
    except ConfigError as err:
        checks = [Check("config", ERROR, f"{path} has {len(err.issues)} problem(s)", f"sluice validate {path}")]
        checks += [Check("config", ERROR, str(i)) for i in err.issues[:20]]
        return checks, None
    except OSError as exc:
        return [Check("config", ERROR, f"cannot read {path}: {exc.strerror or exc}", "check its permissions")], None
    n = sum(len(v) for v in loaded.nodes.values())
    return [Check("config", OK, f"{path} is valid: {len(loaded.nodes)} pipelines, {n} nodes")], loaded


def _service_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(os.environ.get("SLUICE_SERVICE_USER", SERVICE_USER))
    except KeyError:
        return None


def _user_can(path: Path, mode: int, user: pwd.struct_passwd | None) -> bool:
    """Whether the service user (or, without one, this process) may open ``path`` with ``mode``."""
    if user is None or os.geteuid() != 0 or user.pw_uid == os.geteuid():
        return os.access(path, mode)
    st = path.stat()
    groups = {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem} | {user.pw_gid}
    if st.st_uid == user.pw_uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    want = (4 if mode & os.R_OK else 0) | (2 if mode & os.W_OK else 0) | (1 if mode & os.X_OK else 0)
    return bits & want == want


def check_data_dir(loaded: LoadedConfig) -> list[Check]:
    data = Path(loaded.config.gateway.data_dir)
    user = _service_user()
    who = f"user {user.pw_name}" if user and os.geteuid() == 0 else "this user"
    out: list[Check] = []
    if not data.exists():
        parent = next((p for p in data.parents if p.exists()), Path("/"))
        if _user_can(parent, os.W_OK | os.X_OK, user):
            out.append(Check("data", OK, f"{data} does not exist yet; the gateway creates it at start"))
        else:
            out.append(Check("data", ERROR, f"{data} does not exist and {who} cannot create it in {parent}"))
        return out
    if _user_can(data, os.W_OK | os.X_OK, user):
        out.append(Check("data", OK, f"{data} is writable by {who}"))
    else:
        out.append(Check("data", ERROR, f"{who} cannot write to {data}", f"chown -R {SERVICE_USER}: {data}"))
    usage = shutil.disk_usage(data)
    free = f"{usage.free / 2**20:,.0f} MiB free of {usage.total / 2**20:,.0f} MiB"
    if usage.free < FREE_ERROR_BYTES:
        out.append(Check("disk", ERROR, f"the disk holding {data} is full: {free}", "free space or move data_dir"))
    elif usage.free < FREE_WARN_BYTES or usage.free < usage.total * 0.05:
        out.append(Check("disk", WARN, f"the disk holding {data} is nearly full: {free}"))
    else:
        out.append(Check("disk", OK, free))
    for db in sorted(data.glob("*.db")):
        out.extend(check_database(db))
    out.extend(check_schemas(data))
    return out


def check_schemas(data: Path) -> list[Check]:
    """Each database's schema version against the one this Sluice gives it (read-only)."""
    out: list[Check] = []
    for name, schema in known_schemas().items():
        path = data / name
        try:
            found = read_version(path)
        except sqlite3.Error:
            continue  # check_database already says the file cannot be read
        if found is None:
            continue  # created at start
        known = schema.version
        if found == known:
            out.append(Check("schema", OK, f"{name}: schema version {found}, current"))
        elif found < known:
            out.append(
                Check(
                    "schema",
                    WARN,
                    f"{name}: schema version {found}; this Sluice upgrades it to {known} at the gateway's next start",
                    "restart the gateway (systemctl restart sluice); a backup first (sluice backup) keeps a way back",
                )
            )
        else:
            out.append(
                Check(
                    "schema",
                    ERROR,
                    f"{name}: schema version {found} is newer than this Sluice ({__version__}) knows ({known}): "
                    "the gateway refuses to start on it",
                    "install the newer Sluice again, or restore a backup made before the upgrade",
                )
            )
    return out


def check_database(path: Path) -> list[Check]:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT)
    except sqlite3.Error as exc:
        return [Check("database", ERROR, f"{path.name} cannot be opened: {exc}")]
    try:
        rows = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
        if rows != ["ok"]:
            return [
                Check(
                    "database",
                    ERROR,
                    f"{path.name} is damaged: {'; '.join(rows)}",
                    f"stop the gateway, move {path} aside (the gateway starts a fresh one), or sluice restore a backup",
                )
            ]
        out = [Check("database", OK, f"{path.name}: intact")]
        if path.name == "outbox.db":
            try:
                (n,) = con.execute("SELECT count(*) FROM outbox").fetchone()
            except sqlite3.Error:
                n = 0
            if n > OUTBOX_WARN_ROWS:
                out.append(
                    Check("outbox", WARN, f"{n:,} messages wait to be sent", "the broker has been unreachable a while")
                )
            else:
                out.append(Check("outbox", OK, f"{n:,} messages wait to be sent"))
        return out
    except sqlite3.DatabaseError as exc:
        return [Check("database", ERROR, f"{path.name} is not a readable database: {exc}", "restore a backup")]
    finally:
        con.close()


async def _mqtt_connect(name: str, conn: MqttConnection) -> Check:
    import gmqtt

    from .mqtt import _tls_context

    where = f"{conn.host}:{conn.port}"
    client = gmqtt.Client(f"{conn.client_id or 'sluice'}-doctor-{os.getpid()}")
    if conn.username:
        client.set_auth_credentials(conn.username, conn.password)
    try:
        ctx: Any = _tls_context(conn) if conn.tls else False
        await asyncio.wait_for(
            client.connect(conn.host, conn.port, keepalive=10, ssl=ctx, raise_exc=True), timeout=TIMEOUT
        )
    except gmqtt.mqtt.handler.MQTTConnectError as exc:
        text = str(exc)
        hint = "check username and password" if ("auth" in text.lower() or "4" in text[-3:] or "5" in text[-3:]) else ""
        return Check("connection", ERROR, f"MQTT {name} ({where}): the broker refused the login: {text}", hint)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("connection", ERROR, f"MQTT {name} ({where}): {_plain(exc)}")
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), timeout=2)
        except Exception:  # a half-open client has nothing left to say
            pass
    return Check("connection", OK, f"MQTT {name}: connected to {where}")


async def _tcp(what: str, host: str, port: int, tls: bool = False) -> Check:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context() if tls else None), TIMEOUT
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("connection", ERROR, f"{what} ({host}:{port}): {_plain(exc)}")
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return Check("connection", OK, f"{what}: reachable at {host}:{port}")


def _http_get(what: str, url: str, headers: dict[str, str]) -> Check:
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.username is not None:  # urllib takes no credentials in the URL: send them as basic auth
        import base64

        cred = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        headers = {"Authorization": f"Basic {cred}", **headers}
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return Check("connection", OK, f"{what}: {shown} answers ({resp.status})")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return Check("connection", ERROR, f"{what}: {shown} refuses the credentials ({exc.code})", "check api_key")
        # the server is there; a 404 on /models is common for servers that only serve completions
        return Check("connection", OK, f"{what}: {shown} reachable (answered {exc.code})")
    except urllib.error.URLError as exc:
        return Check(
            "connection",
            ERROR,
            f"{what}: {shown}: {_plain(exc.reason) if isinstance(exc.reason, BaseException) else exc.reason}",
        )
    except (OSError, TimeoutError) as exc:
        return Check("connection", ERROR, f"{what}: {shown}: {_plain(exc)}")


def _endpoints(loaded: LoadedConfig) -> Iterator[tuple[str, str, Any]]:
    """(label, kind, target) of every network peer and serial device the nodes name, found by field."""
    for pipeline, nodes in loaded.nodes.items():
        for o in nodes:
            label = f"{pipeline}/{o.id} ({o.type})"
            url = getattr(o, "url", None)
            if isinstance(url, str) and "://" in url:
                yield label, "url", url
            host = getattr(o, "host", None)
            port = getattr(o, "port", None)
            if isinstance(host, str) and isinstance(port, int) and getattr(o, "transport", "tcp") == "tcp":
                yield label, "tcp", (host, port)
            for field in ("port", "device"):
                dev = getattr(o, field, None)
                if isinstance(dev, str) and dev.startswith("/dev/"):
                    yield label, "serial", dev
            servers = getattr(o, "bootstrap_servers", None)
            if isinstance(servers, str):
                servers = [x.strip() for x in servers.split(",") if x.strip()]
            if isinstance(servers, list | tuple):
                for s in servers:
                    h, _, p = str(s).rpartition(":")
                    if h and p.isdigit():
                        yield label, "tcp", (h, int(p))


def check_serial(label: str, dev: str) -> Check:
    path = Path(dev)
    if not path.exists():
        return Check(
            "device", ERROR, f"{label}: {dev} is not there", "is the adapter plugged in? ls /dev/serial/by-id/"
        )
    real = path.resolve()
    if not stat.S_ISCHR(real.stat().st_mode):
        return Check("device", WARN, f"{label}: {dev} is not a character device")
    user = _service_user()
    who = f"user {user.pw_name}" if user and os.geteuid() == 0 else "this user"
    if not _user_can(real, os.R_OK | os.W_OK, user):
        group = grp.getgrgid(real.stat().st_gid).gr_name
        return Check("device", ERROR, f"{label}: {who} may not open {dev}", f"add it to group {group}")
    return Check("device", OK, f"{label}: {dev} present and usable by {who}")


async def check_connections(loaded: LoadedConfig) -> list[Check]:
    jobs: list[Any] = [_mqtt_connect(name, conn) for name, conn in loaded.config.connections.items()]
    out: list[Check] = []
    for label, kind, target in _endpoints(loaded):
        if kind == "serial":
            out.append(check_serial(label, target))
        elif kind == "tcp":
            jobs.append(_tcp(label, *target))
        else:
            parts = urlsplit(target)
            default = {"https": 443, "wss": 443, "http": 80, "ws": 80, "redis": 6379, "rediss": 6379}.get(
                parts.scheme, 80
            )
            if parts.hostname:
                jobs.append(_tcp(f"{label} {redact_url(target)}", parts.hostname, parts.port or default))
    for name, provider in loaded.config.llm.providers.items():
        url = getattr(provider, "url", None)
        if url:
            key = getattr(provider, "api_key", None)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            jobs.append(asyncio.to_thread(_http_get, f"LLM {name}", url.rstrip("/") + "/models", headers))
        else:
            jobs.append(asyncio.to_thread(check_model, name, provider))
    out.extend(await asyncio.gather(*jobs))
    return out


def check_model(name: str, provider: Any) -> Check:
    package = getattr(provider, "package", None)
    if package:
        import importlib.util

        from .schema import package_gguf

        if package_gguf(package) is None and importlib.util.find_spec(package) is None:
            return Check("model", ERROR, f"LLM {name}: model package {package} is not installed")
        return Check("model", OK, f"LLM {name}: model package {package} installed")
    path = Path(provider.model or "")
    if not provider.model or not path.is_file():
        return Check("model", ERROR, f"LLM {name}: model file {path} is missing")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return Check("model", ERROR, f"LLM {name}: {path} is not a GGUF model file")
    problem = _llama_cpp_problem()
    if problem is not None:
        return Check("model", ERROR, f"LLM {name}: {problem}", "install with --extras llm")
    return Check("model", OK, f"LLM {name}: {path.name} ({path.stat().st_size / 2**20:,.0f} MiB) present")


def _llama_cpp_problem() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it loads. It is imported in a child
    process: its native library is what may fail (a missing libgomp, an older glibc), and its
    import in this process would load that library for nothing and leave two open files of
    /dev/null (``llama_cpp._utils``) to a ResourceWarning at exit."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    try:
        done = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", "import llama_cpp"],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONDEVMODE", "PYTHONWARNINGS")},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"llama-cpp-python could not be tried: {exc}"
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return f"llama-cpp-python does not load: {lines[-1] if lines else f'exit status {done.returncode}'}"
    return None


def _ntp_state() -> int | None:
    """adjtimex(2) with no change: 5 (TIME_ERROR) when the kernel clock is not synchronised."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    buf = ctypes.create_string_buffer(512)  # struct timex is ~208 bytes; modes=0 reads only
    rc = libc.adjtimex(buf)
    return None if rc < 0 else int(rc)


def check_clock() -> list[Check]:
    out: list[Check] = []
    year = time.gmtime().tm_year
    if year < 2025:
        out.append(Check("clock", ERROR, f"the clock says {year}: it was never set", "check NTP (timedatectl)"))
    state = _ntp_state()
    if state == 5:
        out.append(
            Check(
                "clock",
                WARN,
                "the clock is not synchronised by NTP: readings without a device time get this clock's time",
                "timedatectl set-ntp true; check that the gateway reaches an NTP server",
            )
        )
    elif state is not None:
        out.append(Check("clock", OK, "the clock is synchronised (NTP)"))
    rtc = any(Path(p).exists() for p in ("/dev/rtc0", "/dev/rtc"))
    out.append(
        Check("clock", OK, "a real-time clock is present")
        if rtc
        else Check(
            "clock",
            WARN,
            "no real-time clock: after a power cut the time is wrong until NTP answers",
            "Sluice keeps its ingest clock monotonic, but consider an RTC module",
        )
    )
    return out


def check_console(loaded: LoadedConfig) -> list[Check]:
    c = loaded.config.console
    if not c.enabled:
        return [Check("console", OK, "the console is turned off")]
    out: list[Check] = []
    if c.host not in ("127.0.0.1", "localhost", "::1") and not c.tls_cert:
        out.append(
            Check("console", WARN, f"the console listens on {c.host} without TLS: passwords cross the network in clear")
        )
    if c.host not in ("127.0.0.1", "localhost", "::1") and not c.auth:
        out.append(Check("console", ERROR, f"the console listens on {c.host} with auth: false: anyone can change it"))
    host = "127.0.0.1" if c.host in ("0.0.0.0", "::", "") else c.host
    scheme = "https" if c.tls_cert else "http"
    url = f"{scheme}://{host}:{c.port}/healthz"
    ctx = ssl._create_unverified_context() if c.tls_cert else None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=ctx) as resp:
            status = json.loads(resp.read() or b"{}").get("status", "?")
        out.append(Check("console", OK, f"the console answers at {scheme}://{host}:{c.port}/ (status {status})"))
    except urllib.error.HTTPError as exc:
        out.append(Check("console", WARN, f"the console at {host}:{c.port} answered {exc.code}"))
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        why = _plain(reason) if isinstance(reason, BaseException) else reason
        out.append(
            Check(
                "console",
                WARN,
                f"nothing answers at {host}:{c.port}: {why}",
                "is the gateway running? systemctl status sluice",
            )
        )
    return out


def check_service() -> list[Check]:
    if not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
        return []
    res = subprocess.run(["systemctl", "is-active", "sluice"], capture_output=True, text=True, timeout=10)
    state = res.stdout.strip() or "unknown"
    if state == "active":
        return [Check("service", OK, "the sluice service is running")]
    if state == "inactive" and "could not be found" in res.stderr:
        return []
    return [Check("service", ERROR, f"the sluice service is {state}", "journalctl -u sluice -n 50 says why")]


def run_doctor(config: Path) -> list[Check]:
    checks, loaded = check_config(config)
    if loaded is not None:
        checks += check_data_dir(loaded)
        checks += asyncio.run(check_connections(loaded))
        checks += check_console(loaded)
    checks += check_clock()
    checks += check_service()
    return checks


def worst(checks: list[Check]) -> str:
    return max((c.level for c in checks), key=LEVELS.__getitem__, default=OK)


def main(config: Path, as_json: bool, user: str | None = None) -> int:
    if user:
        os.environ["SLUICE_SERVICE_USER"] = user
    checks = run_doctor(config)
    level = worst(checks)
    if as_json:
        json.dump({"status": level, "checks": [asdict(c) for c in checks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for c in checks:
            print(f"[{MARK[c.level]}] {c.area:<10} {c.message}")
            if c.hint and c.level != OK:
                print(f"{'':17} → {c.hint}")
        n_err = sum(c.level == ERROR for c in checks)
        n_warn = sum(c.level == WARN for c in checks)
        verdict = "all good" if level == OK else f"{n_err} error(s), {n_warn} warning(s)"
        print(f"\nsluice doctor: {verdict}")
    return LEVELS[level]
