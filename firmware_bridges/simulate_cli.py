"""``sluice simulate serial|modbus``: run a simulated field device until interrupted.

``serial`` writes readings in any codec to a new pty and prints its path (point a ``serial``
source at it); ``modbus`` serves device profiles over Modbus TCP, or RTU on a pty null-modem
whose gateway-side path it prints. Faults can be injected to watch the gateway cope.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from .codecs import CodecOptions
from .modbus import load_profile, profile_names
from .simulators import ModbusFault, ModbusSimulator, PtyBridge, PtyDevice, SerialSimulator

__all__ = ["add_simulate_parser"]

# A demo layout for `--codec cobs` without options: what a small MCU board might send.
_DEMO_COBS = {
    "type": "cobs",
    "crc": "crc16",
    "fields": [
        {"name": "temp", "type": "i16", "scale": 0.01, "unit": "°C"},
        {"name": "hum", "type": "u16", "scale": 0.01, "unit": "%"},
        {"name": "vbat", "type": "u16", "scale": 0.001, "unit": "V"},
    ],
}


def _codec(text: str) -> Any:
    spec = yaml.safe_load(text)
    if spec == "cobs":
        spec = _DEMO_COBS
    return TypeAdapter(CodecOptions).validate_python(spec)


def _fault(text: str) -> tuple[int, str, float]:
    """``UNIT:KIND[=VALUE]`` with KIND one of dead, exception, delay, drop."""
    try:
        unit, _, rest = text.partition(":")
        kind, _, value = rest.partition("=")
        if kind not in ("dead", "exception", "delay", "drop"):
            raise ValueError(kind)
        return int(unit), kind, float(value or {"exception": 4, "delay": 1.0, "drop": 0.2}.get(kind, 0))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use UNIT:dead, UNIT:exception=CODE, UNIT:delay=SECONDS or UNIT:drop=PROBABILITY"
        ) from None


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def cmd_serial(args: argparse.Namespace) -> int:
    try:
        codec = _codec(args.codec)
    except (ValidationError, yaml.YAMLError) as exc:
        print(f"--codec: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        with PtyDevice(args.link) as dev:
            sim = SerialSimulator(codec, dev, interval=args.interval, noise=args.noise, seed=args.seed)
            where = f"{dev.path} (link {args.link})" if args.link else dev.path
            print(f"serial device ({codec.type}) on {where}", flush=True)
            print(dev.path, flush=True)
            writer = asyncio.create_task(sim.run(args.count), name="simulate-serial")
            waiter = asyncio.create_task(_until_signal(), name="simulate-signal")
            await asyncio.wait({writer, waiter}, return_when=asyncio.FIRST_COMPLETED)
            for t in (writer, waiter):
                t.cancel()
            await asyncio.gather(writer, waiter, return_exceptions=True)
            print(f"sent {sim.sent} readings", file=sys.stderr)

    asyncio.run(main())
    return 0


def cmd_modbus(args: argparse.Namespace) -> int:
    slaves = {}
    try:
        for i, spec in enumerate(args.profile or ["sdm120"]):
            name, _, unit = spec.partition(":")
            slaves[int(unit) if unit else i + 1] = load_profile(name)
    except ValueError as exc:
        print(f"--profile: {exc}", file=sys.stderr)
        return 2
    faults: dict[int, ModbusFault] = {}
    for unit, kind, value in args.fault or []:
        f = faults.setdefault(unit, ModbusFault())
        if kind == "dead":
            f.dead = True
        elif kind == "exception":
            f.exception = int(value)
        elif kind == "delay":
            f.delay = value
        else:
            f.drop = value
    units = ", ".join(f"{u}={m.name}" for u, m in slaves.items())

    async def main() -> None:
        sim = ModbusSimulator(slaves, seed=args.seed, faults=faults)
        bridge = None
        try:
            if args.rtu:
                bridge = PtyBridge().start()
                await sim.start_rtu(bridge.a, baudrate=args.baud)
                print(f"modbus rtu at {args.baud} baud, units {units}; connect the gateway to:", flush=True)
                print(bridge.b, flush=True)
            else:
                await sim.start_tcp(args.host, args.port)
                print(f"modbus tcp on {args.host}:{args.port}, units {units}", flush=True)
            await _until_signal()
        finally:
            await sim.stop()
            if bridge is not None:
                bridge.close()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"cannot serve: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def add_simulate_parser(sub: Any) -> None:
    """Add ``simulate serial`` and ``simulate modbus`` to the ``sluice`` command's subparsers."""
    sim = sub.add_parser("simulate", help="run a simulated field device (serial on a pty, Modbus TCP/RTU)")
    kinds = sim.add_subparsers(dest="device", required=True, metavar="DEVICE")

    ser = kinds.add_parser("serial", help="a serial device on a new pty; prints the pty path")
    ser.add_argument(
        "--codec",
        default="json",
        help="json, csv, kv, nmea, cobs, or codec options as YAML, e.g. "
        "'{type: cobs, crc: crc32, fields: [{name: t, type: i16, scale: 0.01}]}'",
    )
    ser.add_argument("--interval", type=float, default=1.0, help="seconds between readings (default 1)")
    ser.add_argument("--count", type=int, default=None, help="stop after this many readings")
    ser.add_argument("--noise", type=float, default=0.0, help="probability that a reading is corrupted")
    ser.add_argument("--link", help="also make this symlink to the pty (a stable name for configs)")
    ser.add_argument("--seed", type=int, default=None)
    ser.set_defaults(func=cmd_serial)

    mb = kinds.add_parser("modbus", help="Modbus slaves serving device profiles")
    mb.add_argument(
        "--profile",
        action="append",
        help=f"PROFILE[:UNIT], repeatable (default sdm120:1); known: {', '.join(profile_names())}",
    )
    mb.add_argument("--host", default="127.0.0.1")
    mb.add_argument("--port", type=int, default=5020, help="TCP port (default 5020)")
    mb.add_argument("--rtu", action="store_true", help="serve RTU on a pty null-modem instead of TCP")
    mb.add_argument("--baud", type=int, default=9600)
    mb.add_argument(
        "--fault",
        action="append",
        type=_fault,
        help="UNIT:dead | UNIT:exception=CODE | UNIT:delay=SECONDS | UNIT:drop=PROBABILITY",
    )
    mb.add_argument("--seed", type=int, default=None)
    mb.set_defaults(func=cmd_modbus)
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
