#!/usr/bin/env python3
"""Modbus poll benchmark: points/s from a pymodbus TCP server, Sluice's batched source vs one request per point.

A Modbus TCP server of its own (``sluice simulate modbus``: firmware_bridges' ModbusSimulator, a
real pymodbus server, in its own process on a free loopback port) serves S slaves with the
``sdm630`` profile (15 points each: 12 in the ``fast`` group, 3 energy counters). One TCP
connection per subject, each polling as fast as the server answers, for D seconds:

  naive    a pymodbus client reading every point with its own request (``count`` = the point's
           registers) and decoding it: what a simple polling script does
  batched  the same client calls, but one request per block that ``plan_reads`` makes (the same
           plan the source uses: adjacent points of one table, gaps up to the profile's max_gap)
  sluice   a real in-process pipeline: the ``modbus`` source (all groups due at once, every
           slave) -> the engine -> a sink that counts events

Subjects alternate, R rounds; the best round counts. Figures per subject: points per second
(wall), requests per second, the client process's CPU µs per point (``time.process_time``).
``ratio`` = sluice ÷ naive points per second: what batching buys. The output ends with one JSON line.

  .venv/bin/python scripts/bench/modbus_poll.py [--slaves 4] [--duration 8] [--repeat 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from _common import free_port, log  # noqa: E402
from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from firmware_bridges.modbus import decode_point, load_profile, plan_reads  # noqa: E402
from gateway.deadletter import DeadLetters  # noqa: E402
from gateway.engine import Pipeline  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.node import NodeContext, NodeOptions, Sink, register  # noqa: E402
from gateway.runtime import settle_heap  # noqa: E402
from nodes.devices import ModbusOptions, SlaveOptions  # noqa: E402

PROFILE = "sdm630"


async def start_server(port: int, slaves: int) -> asyncio.subprocess.Process:
    sluice = ROOT / ".venv" / "bin" / "sluice"
    cmd = [str(sluice)] if sluice.exists() else [sys.executable, "-m", "gateway.cli"]
    args = ["simulate", "modbus", "--port", str(port), "--seed", "1"]
    for u in range(1, slaves + 1):
        args += ["--profile", f"{PROFILE}:{u}"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if b"modbus tcp on" not in line:
        proc.kill()
        raise SystemExit(f"the Modbus simulator did not start: {line!r}")
    return proc


def _read(client: AsyncModbusTcpClient, table: str) -> Any:
    return {
        "coil": client.read_coils,
        "discrete": client.read_discrete_inputs,
        "holding": client.read_holding_registers,
        "input": client.read_input_registers,
    }[table]


async def run_direct(port: int, slaves: int, duration: float, batched: bool) -> dict[str, Any]:
    """naive (one request per point) or batched (plan_reads blocks), same client calls as the source."""
    dmap = load_profile(PROFILE)
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0, reconnect_delay=0)
    if not await client.connect():
        raise SystemExit(f"cannot connect to the simulator on port {port}")
    if batched:
        groups: dict[str, list[Any]] = {}
        for p in dmap.points:
            groups.setdefault(p.group, []).append(p)
        plan = [b for pts in groups.values() for b in plan_reads(pts, dmap.max_registers, dmap.max_gap)]
        reads = [(b.table, b.start, b.count, b.points) for b in plan]
    else:
        reads = [(p.table, p.address, p.count, [p]) for p in dmap.points]
    points = requests = 0
    values: list[Any] = []
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        end = t0 + duration
        while time.perf_counter() < end:
            for unit in range(1, slaves + 1):
                for table, start, count, pts in reads:
                    rr = await _read(client, table)(start, count=count, device_id=unit)
                    requests += 1
                    if rr.isError():
                        raise SystemExit(f"unit {unit}: {rr}")
                    data = rr.bits if table in ("coil", "discrete") else rr.registers
                    for p in pts:
                        off = p.address - start
                        values.append(decode_point(p, data[off : off + p.count], dmap.order(p)))
                    points += len(pts)
                    if len(values) > 10_000:
                        values.clear()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        client.close()
    return {"points": points, "requests": requests, "wall_s": wall, "cpu_s": cpu}


class _CountOptions(NodeOptions):
    type: Literal["bench_modbus_count"]


class _Count(Sink):
    Options = _CountOptions
    n = 0

    async def write(self, batch: list[Event]) -> None:
        type(self).n += len(batch)


async def run_sluice(port: int, slaves: int, duration: float, tmp: Path) -> dict[str, Any]:
    register(_Count)
    _Count.n = 0
    dl = DeadLetters(None)
    groups = {g: 0.001 for g in load_profile(PROFILE).groups}  # always due: poll back to back
    opts = [
        ModbusOptions(
            id="meters",
            type="modbus",
            host="127.0.0.1",
            port=port,
            timeout=2,
            interval=0.001,
            slaves=[SlaveOptions(unit=u, profile=PROFILE, groups=groups) for u in range(1, slaves + 1)],
        ),
        _CountOptions(id="out", type="bench_modbus_count", input=["meters"]),
    ]
    p = Pipeline("p", opts, lambda nid: NodeContext("bench", "p", nid, str(tmp), None, dl))
    src = p.nodes[p.index["meters"]]
    task = asyncio.create_task(p.run())
    deadline = time.monotonic() + 10
    while _Count.n == 0:  # connected and the first poll went through
        if time.monotonic() > deadline:
            raise SystemExit(f"the modbus source polled nothing in 10 s: {src.health()}")
        await asyncio.sleep(0.005)
    n0, r0 = _Count.n, src.n_reads
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.sleep(duration)
    n1, r1 = _Count.n, src.n_reads
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    faults = dict(src.faults)
    p.stop()
    await task
    return {"points": n1 - n0, "requests": r1 - r0, "wall_s": wall, "cpu_s": cpu, "faults": faults}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slaves", type=int, default=4, help=f"{PROFILE} slaves on the server (units 1..S)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds each subject polls per round")
    ap.add_argument("--repeat", type=int, default=2, help="rounds, subjects alternating; the best counts")
    ap.add_argument("--quick", action="store_true", help="3 s per subject, one round")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.repeat = 3.0, 1
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    settle_heap()  # the collector settings of a running gateway, for every subject
    t_start = time.perf_counter()
    port = free_port()
    server = await start_server(port, args.slaves)
    best: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-modbus-") as tmp:
            for r in range(args.repeat):
                for subject in ("naive", "batched", "sluice"):
                    log(f"{subject}: round {r + 1}/{args.repeat}, {args.slaves} slaves, {args.duration:g} s ...")
                    if subject == "sluice":
                        res = await run_sluice(port, args.slaves, args.duration, Path(tmp))
                    else:
                        res = await run_direct(port, args.slaves, args.duration, batched=subject == "batched")
                    res["points_s"] = res["points"] / res["wall_s"]
                    if subject not in best or res["points_s"] > best[subject]["points_s"]:
                        best[subject] = res
    finally:
        server.terminate()
        await server.wait()
    dmap = load_profile(PROFILE)
    out: dict[str, Any] = {"bench": "modbus_poll", "ratio": None}
    print(f"{'subject':<8} {'points/s':>9} {'requests/s':>11} {'points/request':>15} {'CPU us/point':>13}")
    for subject in ("naive", "batched", "sluice"):
        s = best[subject]
        req_s = s["requests"] / s["wall_s"]
        per_req = s["points"] / max(1, s["requests"])
        us = s["cpu_s"] / max(1, s["points"]) * 1e6
        print(f"{subject:<8} {s['points_s']:>9.0f} {req_s:>11.0f} {per_req:>15.1f} {us:>13.1f}")
        out[f"{subject}_points_s"] = round(s["points_s"])
        out[f"{subject}_requests_s"] = round(req_s)
        out[f"{subject}_points_per_request"] = round(per_req, 2)
        out[f"{subject}_cpu_us_per_point"] = round(us, 1)
    out["ratio"] = round(best["sluice"]["points_s"] / best["naive"]["points_s"], 3)
    out["batched_vs_naive"] = round(best["batched"]["points_s"] / best["naive"]["points_s"], 3)
    out["sluice_vs_batched"] = round(best["sluice"]["points_s"] / best["batched"]["points_s"], 3)
    out["sluice_faults"] = best["sluice"]["faults"]
    print(
        f"ratio sluice/naive {out['ratio']:.2f}; batched/naive {out['batched_vs_naive']:.2f}; "
        f"sluice/batched {out['sluice_vs_batched']:.2f} (pipeline cost over the bare batched loop)"
    )
    out.update(
        profile=PROFILE,
        points_per_slave=len(dmap.points),
        slaves=args.slaves,
        duration_s=args.duration,
        repeat=args.repeat,
        quick=args.quick,
        wall_s=round(time.perf_counter() - t_start, 1),
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
