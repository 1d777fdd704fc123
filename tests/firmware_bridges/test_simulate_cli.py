"""`sluice simulate serial|modbus` as real processes, read by a real gateway."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests._util import free_port, wait_for
from tests.gateway._harness import node, running_gateway


@asynccontextmanager
async def simulate(*args: str, lines: int = 1) -> AsyncIterator[list[str]]:
    """Start `sluice simulate ARGS`, yield its first output lines; SIGTERM it and expect exit 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "simulate",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        out = []
        for _ in range(lines):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            if not line:
                err = await proc.stderr.read()
                raise AssertionError(f"simulator exited: {err.decode()}")
            out.append(line.decode().strip())
        yield out
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 20)
        err = (await proc.stderr.read()).decode()
        assert rc == 0, err
        assert "Traceback" not in err, err


def gateway_config(tmp_path: Path, source: str) -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {source}
      - {{id: out, type: log, input: dev, level: debug}}
"""


async def test_simulate_serial_nmea_read_by_a_serial_source(tmp_path: Path) -> None:
    link = tmp_path / "ttyGPS"
    async with simulate("serial", "--codec", "nmea", "--interval", "0.05", "--link", str(link), lines=2) as out:
        assert out[0].startswith("serial device (nmea) on /dev/pts/") and out[1].startswith("/dev/pts/")
        assert link.resolve() == Path(out[1])
        cfg = gateway_config(tmp_path, f'{{id: dev, type: serial, port: "{link}", baud: 4800, codec: nmea}}')
        async with running_gateway(cfg) as gw:
            src = node(gw, "p", "dev")
            await wait_for(lambda: src.n_out >= 30, timeout=15)
            assert src.counters()["malformed"] == 0
            assert src.health()["decoder"]["pieces"] >= 5


async def test_simulate_serial_cobs_with_noise_is_dead_lettered(tmp_path: Path) -> None:
    async with simulate(
        "serial", "--codec", "cobs", "--interval", "0.01", "--noise", "0.3", "--seed", "5", lines=2
    ) as out:
        codec = (
            "{type: cobs, crc: crc16, fields: [{name: temp, type: i16, scale: 0.01}, "
            "{name: hum, type: u16, scale: 0.01}, {name: vbat, type: u16, scale: 0.001}]}"
        )
        cfg = gateway_config(tmp_path, f'{{id: dev, type: serial, port: "{out[1]}", codec: {codec}}}')
        async with running_gateway(cfg) as gw:
            src = node(gw, "p", "dev")
            await wait_for(lambda: src.n_out >= 60 and src.counters()["malformed"] >= 3, timeout=15)
            assert gw.dead_letters.counts[("p", "dev")] == src.counters()["malformed"]


async def test_simulate_modbus_tcp_with_a_fault(tmp_path: Path) -> None:
    port = free_port()
    async with simulate(
        "modbus", "--profile", "sdm120:1", "--profile", "xy-md02:2", "--port", str(port), "--fault", "2:exception=2"
    ) as out:
        assert out[0] == f"modbus tcp on 127.0.0.1:{port}, units 1=sdm120, 2=xy-md02"
        source = (
            f"{{id: dev, type: modbus, host: 127.0.0.1, port: {port}, timeout: 0.5s, slaves: "
            "[{unit: 1, name: meter, profile: sdm120}, {unit: 2, name: room, profile: xy-md02}]}"
        )
        async with running_gateway(gateway_config(tmp_path, source)) as gw:
            src = node(gw, "p", "dev")
            await wait_for(lambda: src.n_out >= 14 and src.counters()["modbus_exception"] >= 2, timeout=15)
            room = src.health()["slaves"]["room"]
            assert room["bad"]["temperature"] == "exception 2 (illegal data address)"
            assert src.health()["slaves"]["meter"]["state"] == "ok"


async def test_simulate_modbus_rtu_prints_the_port(tmp_path: Path) -> None:
    async with simulate("modbus", "--profile", "pzem016", "--rtu", "--baud", "19200", lines=2) as out:
        assert out[0].startswith("modbus rtu at 19200 baud, units 1=pzem016")
        source = (
            f'{{id: dev, type: modbus, transport: rtu, device: "{out[1]}", baud: 19200, timeout: 0.5s, '
            "slaves: [{unit: 1, name: pz, profile: pzem016}]}"
        )
        async with running_gateway(gateway_config(tmp_path, source)) as gw:
            src = node(gw, "p", "dev")
            await wait_for(lambda: src.n_out >= 7, timeout=15)
            assert src.health()["slaves"]["pz"]["state"] == "ok"


async def test_simulate_rejects_bad_arguments() -> None:
    for args, msg in ((["serial", "--codec", "morse"], b"--codec"), (["modbus", "--profile", "nope"], b"nope")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "simulate",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2 and msg in err and b"Traceback" not in err, err
