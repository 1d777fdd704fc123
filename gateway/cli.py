"""The ``sluice`` command: run a gateway, validate a config, print the config's JSON Schema."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigError, SluiceError

if TYPE_CHECKING:
    import argparse

    from .config import LoadedConfig

# Nothing heavy at import time: `sluice run` decides whether OpenSSL may load (gateway._tls)
# before asyncio is imported, so the config, runtime and simulators load inside the commands.

__all__ = ["main"]

log = logging.getLogger("sluice")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


def _print_issues(err: ConfigError) -> None:
    for issue in err.issues:
        print(issue, file=sys.stderr)
    n = len(err.issues)
    print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)


def load_config(path: str | Path) -> LoadedConfig:
    from .config import load_config

    return load_config(path)


_PYDANTIC_LOADER = "pydantic.plugin._loader"


def _pydantic_plugins_off() -> None:
    """No pydantic plug-ins in ``sluice run``, and no package metadata read to look for them.

    They would only watch the validation of the gateway's config. pydantic's plug-in loader
    imports importlib.metadata (with zipfile, email, csv, tempfile: ~1.5 MiB resident) as the
    first model is built, even when ``PYDANTIC_DISABLE_PLUGINS`` tells it to load none. So that
    variable is set (unless the environment has it already: then it decides, as in any pydantic
    program) and, while it says none, the loader is a module whose ``get_plugins`` says none
    too; any other name of it imports the real loader and is taken from there.
    """
    import os

    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if os.environ["PYDANTIC_DISABLE_PLUGINS"] != "__all__" or _PYDANTIC_LOADER in sys.modules:
        return
    import types

    loader = types.ModuleType(_PYDANTIC_LOADER, "pydantic's plug-in loader while PYDANTIC_DISABLE_PLUGINS=__all__")

    def get_plugins() -> tuple[()]:
        return ()

    def real(name: str) -> object:
        import importlib

        if name.startswith("__"):  # the import system asks for __path__ and the like
            raise AttributeError(name)
        if sys.modules.get(_PYDANTIC_LOADER) is loader:
            del sys.modules[_PYDANTIC_LOADER]
        return getattr(importlib.import_module(_PYDANTIC_LOADER), name)

    loader.get_plugins = get_plugins  # type: ignore[attr-defined]
    loader.__getattr__ = real  # type: ignore[method-assign]
    sys.modules[_PYDANTIC_LOADER] = loader


def cmd_run(args: argparse.Namespace | SimpleNamespace) -> int:
    import contextlib

    from ._tls import deferred_openssl, keep_out_unless_needed

    _pydantic_plugins_off()

    path = Path(args.config) if args.config else DEMO_CONFIG
    try:
        text: str | None = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None  # load_config says what is wrong with the file
    else:
        keep_out_unless_needed(text)
    # OpenSSL is decided before asyncio is imported (gateway._tls)
    with contextlib.nullcontext() if text is None else deferred_openssl(text):
        import asyncio

        from ._log import setup_logging

        try:
            loaded = load_config(path)
        except ConfigError as err:
            _print_issues(err)
            return 1
        setup_logging(
            args.log_level or loaded.config.gateway.log_level, args.log_format or loaded.config.gateway.log_format
        )
        if not args.config:
            log.info("no config given: running the demo (%s)", path)
        from .runtime import Gateway

    try:
        asyncio.run(Gateway(loaded).run())
    except OSError as exc:
        # say which file or directory (data_dir, a database …) when the error names one
        where = f"{exc.filename}: " if exc.filename else ""
        log.error("cannot run: %s%s", where, exc.strerror or exc)
        return 1
    except SluiceError as exc:  # e.g. a local model that cannot load: one line, not a traceback
        log.error("%s", exc)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        _print_issues(err)
        return 1
    n_nodes = sum(len(v) for v in loaded.nodes.values())
    print(f"{args.config}: valid ({len(loaded.nodes)} pipelines, {n_nodes} nodes)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .config import json_schema

    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from .web.auth import MIN_PASSWORD, hash_password

    password = sys.stdin.readline().rstrip("\n") if args.stdin else getpass.getpass("console password: ")
    if len(password) < MIN_PASSWORD:
        print(f"the password needs at least {MIN_PASSWORD} characters", file=sys.stderr)
        return 1
    if not args.stdin and getpass.getpass("again: ") != password:
        print("the two passwords differ", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_export_flink(args: argparse.Namespace) -> int:
    from .export_flink import ExportError, export_flink

    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        _print_issues(err)
        return 1
    try:
        job = export_flink(loaded, args.pipeline)
    except ExportError as exc:
        print(f"sluice export flink: pipeline {args.pipeline!r} cannot be exported:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    if args.output in (None, "-"):
        sys.stdout.write(job)
    else:
        Path(args.output).write_text(job)
        print(f"{args.output}: PyFlink job for pipeline {args.pipeline!r} (run it with python {args.output})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor

    return doctor(Path(args.config), args.json, args.user)


def cmd_backup(args: argparse.Namespace) -> int:
    from .backup import BackupError, backup

    try:
        done = backup(Path(args.config), Path(args.output) if args.output else None)
    except (BackupError, ConfigError, OSError) as exc:
        if isinstance(exc, ConfigError):
            _print_issues(exc)
        else:
            print(f"sluice backup: {exc}", file=sys.stderr)
        return 1
    size = done.archive.stat().st_size
    print(f"{done.archive}: gateway {done.gateway_id}, {len(done.files)} files, {size / 1024:,.0f} KiB")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .backup import BackupError, restore

    try:
        done = restore(Path(args.archive), Path(args.config), force=args.force, with_config=args.with_config)
    except (BackupError, ConfigError, OSError) as exc:
        if isinstance(exc, ConfigError):
            _print_issues(exc)
        else:
            print(f"sluice restore: {exc}", file=sys.stderr)
        return 1
    print(f"restored gateway {done.gateway_id} from {done.archive} ({len(done.files)} files); start the gateway")
    return 0


def cmd_state_reset_watermark(args: argparse.Namespace) -> int:
    import time

    from ._state_tools import data_dir_lock, reset_watermark

    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        _print_issues(err)
        return 1
    nodes = {o.id: o for o in loaded.nodes.get(args.pipeline, [])}
    if args.pipeline not in loaded.nodes:
        print(f"no pipeline {args.pipeline!r} in {args.config} (pipelines: {', '.join(loaded.nodes)})", file=sys.stderr)
        return 1
    from .node import get_node_type

    opts = nodes.get(args.node)
    cls = get_node_type(opts.type) if opts is not None else None
    if opts is None or cls is None or not cls.keeps_watermark:
        what = f"is a {opts.type} node" if opts is not None else "is not in the pipeline"
        print(f"{args.pipeline}/{args.node} {what}: only a window node has a watermark", file=sys.stderr)
        return 1
    data_dir = Path(loaded.config.gateway.data_dir)
    cutoff = time.time() + args.future
    try:
        with data_dir_lock(data_dir, exclusive=True):
            done = reset_watermark(data_dir / "state.db", args.pipeline, args.node, cutoff)
    except SluiceError as exc:
        print(f"sluice state reset-watermark: {exc}", file=sys.stderr)
        return 1
    wm = done["watermark"]
    print(
        f"{args.pipeline}/{args.node}: watermark reset (was {wm if wm is not None else 'unset'}; newest time per "
        f"source was {json.dumps(done['sources'])}); dropped {done['windows_dropped']} windows starting after "
        f"{cutoff:.0f} (now + {args.future:g}s)"
    )
    return 0


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("config", nargs="?", help="YAML config file")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="overrides gateway.log_level")
    run.add_argument("--log-format", choices=LOG_FORMATS, help="overrides gateway.log_format")
    run.set_defaults(func=cmd_run)


def _plain_run_arguments(argv: list[str]) -> SimpleNamespace | None:
    """``sluice run``'s arguments read without argparse, which a running gateway would keep in
    memory for its whole life (~0.35 MiB); None for anything else (``--help``, a mistake, an
    option given twice), which argparse then answers as before."""
    found: dict[str, str | None] = {"config": None, "log_level": None, "log_format": None}
    options = {"--log-level": ("log_level", LOG_LEVELS), "--log-format": ("log_format", LOG_FORMATS)}
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in options:
            key, choices = options[name]
            given = value if eq else next(args, None)
            if given not in choices or found[key] is not None:
                return None
            found[key] = given
        elif arg.startswith("-") or found["config"] is not None:
            return None
        else:
            found["config"] = arg
    return SimpleNamespace(**found, func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(prog="sluice", description="Sluice: continuous pipelines for edge/IoT gateways.")
    p.add_argument("--version", action="version", version=f"sluice {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a gateway (no CONFIG: the bundled demo)")
    _run_arguments(run)

    val = sub.add_parser("validate", help="check a config; print every problem as FILE:LINE: path: message")
    val.add_argument("config", help="YAML config file")
    val.set_defaults(func=cmd_validate)

    sch = sub.add_parser("schema", help="print the config's JSON Schema (for editors)")
    sch.set_defaults(func=cmd_schema)

    from firmware_bridges.simulate_cli import add_simulate_parser

    add_simulate_parser(sub)

    ex = sub.add_parser("export", help="translate a pipeline for another engine (flink)")
    ex_sub = ex.add_subparsers(dest="engine", required=True, metavar="ENGINE")
    fl = ex_sub.add_parser("flink", help="write a PyFlink job that computes what the pipeline computes")
    fl.add_argument("config", help="YAML config file")
    fl.add_argument("--pipeline", required=True, help="the pipeline to export")
    fl.add_argument("-o", "--output", help="job file to write (default: standard output)")
    fl.set_defaults(func=cmd_export_flink)

    doc = sub.add_parser("doctor", help="check config, connections, devices, disk, databases, clock and console")
    doc.add_argument("config", nargs="?", default="/etc/sluice/config.yaml", help="YAML config file")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON (for scripts)")
    doc.add_argument("--user", help="check file and device access for this user (default: sluice, when it exists)")
    doc.set_defaults(func=cmd_doctor)

    bk = sub.add_parser("backup", help="write a consistent snapshot of the databases and the config to one archive")
    bk.add_argument("config", nargs="?", default="/etc/sluice/config.yaml", help="YAML config file")
    bk.add_argument("-o", "--output", help="archive path (default: sluice-<gateway>-<time>.tar.gz here)")
    bk.set_defaults(func=cmd_backup)

    rs = sub.add_parser("restore", help="check a backup archive and put its state in the config's data_dir")
    rs.add_argument("archive", help="a file written by sluice backup")
    rs.add_argument("config", nargs="?", default="/etc/sluice/config.yaml", help="YAML config file")
    rs.add_argument("--with-config", action="store_true", help="also put the archive's config at CONFIG")
    rs.add_argument("--force", action="store_true", help="replace existing state, or restore another gateway's")
    rs.set_defaults(func=cmd_restore)

    st = sub.add_parser("state", help="repair the saved state (state.db) while the gateway is stopped")
    st_sub = st.add_subparsers(dest="state_command", required=True, metavar="ACTION")
    rw = st_sub.add_parser(
        "reset-watermark",
        help="forget a window node's watermark (after a reading from a device with a wrong clock)",
        description="Forget a window node's saved watermark and drop its windows that start after now + "
        "--future; the next reading sets the watermark again. Refused while the gateway runs.",
    )
    rw.add_argument("config", help="YAML config file (for data_dir and to check the node)")
    rw.add_argument("--pipeline", required=True)
    rw.add_argument("--node", required=True, help="the window node's id")
    rw.add_argument(
        "--future",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="drop windows starting more than this far after now (default 300)",
    )
    rw.set_defaults(func=cmd_state_reset_watermark)

    hp = sub.add_parser("hash-password", help="print an argon2 hash for console.users[].password_hash")
    hp.add_argument("--stdin", action="store_true", help="read the password from standard input (scripts)")
    hp.set_defaults(func=cmd_hash_password)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        # the full parser imports the simulators' codecs and profiles, which a gateway does not use
        plain = _plain_run_arguments(argv[1:])
        if plain is not None:
            return int(cmd_run(plain))
        import argparse

        run = argparse.ArgumentParser(prog="sluice run", description="run a gateway (no CONFIG: the bundled demo)")
        _run_arguments(run)
        return int(cmd_run(run.parse_args(argv[1:])))
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
