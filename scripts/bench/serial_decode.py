#!/usr/bin/env python3
"""Serial decode benchmark: lines/frames per second through Sluice's codec + serial source vs bare pyserial-asyncio.

A writer process pushes N pre-encoded records (firmware_bridges' encoders) into the device end of a
raw pty pair as fast as the reader takes them; the reader opens the other end with
pyserial-asyncio-fast, as a USB serial adapter would be opened; every subject reads up to
``READ_SIZE`` bytes per wakeup (the serial source's setting; the library's own default is 1 KiB,
which favours neither side more than it costs both). Three codecs, three subjects each:

  bare     a pyserial-asyncio-fast protocol that splits the stream on the delimiter and does the
           least work that yields the values: ``json.loads`` per line, the ``csv`` module's reader
           and ``float`` per CSV cell, or COBS unstuffing + CRC-16 check + ``struct.unpack`` per
           frame (no keys, no events): the floor for Python
  sluice   a real in-process pipeline: the ``serial`` source (codec decoder, one Event per numeric
           field, micro-batches, back-pressure) -> the engine -> a sink that counts events
  record   the same pipeline with the codec's ``record`` option: one Event per line/frame whose
           value holds the fields (what the bare loop makes: one object per piece)

The process settles its heap as the running gateway does (``gateway.runtime.settle_heap``:
``gc.freeze`` once started), so both subjects run under the runtime's collector settings.
Each subject runs R times, alternating, on a fresh pty; the best run counts. Figures per subject:
pieces (lines or frames) per CPU second of the reading process (``time.process_time``; the
writer is another process), the same per wall second, and the readings delivered.
``ratio`` = the lowest of the codecs' record ÷ bare pieces per CPU second (goal >= 0.7): the
like-for-like comparison, one object per piece on both sides. ``per_field_ratio`` is the same for
``sluice`` (five events per piece), printed beside it.
The output ends with one JSON line.

  .venv/bin/python scripts/bench/serial_decode.py [--n 200000] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import csv
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from serial_asyncio_fast import create_serial_connection  # noqa: E402

from firmware_bridges._framing import cobs_decode  # noqa: E402
from firmware_bridges.codecs import CobsCodec, CsvCodec, JsonCodec, make_decoder, make_encoder  # noqa: E402
from firmware_bridges.simulators import PtyDevice  # noqa: E402
from gateway.deadletter import DeadLetters  # noqa: E402
from gateway.engine import Pipeline  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.node import NodeContext, NodeOptions, Sink, register  # noqa: E402
from gateway.runtime import settle_heap  # noqa: E402
from nodes.devices import READ_SIZE, SerialOptions, set_read_size  # noqa: E402

GOAL_RATIO = 0.7
BAUD = 115200  # a pty ignores the rate; the bytes move as fast as both ends go

JSON_CODEC = JsonCodec(type="json")
CSV_CODEC = CsvCodec(type="csv")
COBS_CODEC = CobsCodec.model_validate(
    {
        "type": "cobs",
        "fields": [
            {"name": "seq", "type": "u32"},
            {"name": "temp", "type": "i16", "scale": 0.01},
            {"name": "hum", "type": "u16", "scale": 0.01},
            {"name": "pressure", "type": "u32", "scale": 0.01},
            {"name": "vbat", "type": "u16", "scale": 0.001},
        ],
        "crc": "crc16",
    }
)

# The writer: blocking writes of the whole blob into the pty master, in its own process.
WRITER = (
    "import os,sys\n"
    "fd=int(sys.argv[1]); data=open(sys.argv[2],'rb').read(); os.set_blocking(fd,True)\n"
    "mv=memoryview(data)\n"
    "while mv:\n"
    "    n=os.write(fd,mv[:65536]); mv=mv[n:]\n"
)


async def start_writer(dev: PtyDevice, blobfile: Path) -> asyncio.subprocess.Process:
    assert dev.master is not None
    fd = dev.master
    return await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(fd), str(blobfile), pass_fds=(fd,))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def records(n: int, seed: int = 1) -> list[dict[str, float]]:
    rnd = random.Random(seed)
    t0 = 1_764_300_000.0
    return [
        {
            "ts": round(t0 + i * 0.01, 3),
            "seq": i,
            "temp": round(15 + rnd.random() * 20, 2),
            "hum": round(30 + rnd.random() * 40, 2),
            "pressure": round(990 + rnd.random() * 40, 2),
            "vbat": round(3.0 + rnd.random(), 3),
        }
        for i in range(n)
    ]


def encode(codec: Any, recs: list[dict[str, float]]) -> bytes:
    enc = make_encoder(codec)
    if isinstance(codec, CobsCodec):
        return b"".join(enc.encode({k: v for k, v in r.items() if k != "ts"}) for r in recs)
    return b"".join(enc.encode(r) for r in recs)


# --- bare ---------------------------------------------------------------------------------


class _BareLines(asyncio.Protocol):
    def __init__(self, want: int, done: asyncio.Future[None]):
        self.buf = b""
        self.n = 0
        self.values = 0
        self.want = want
        self.done = done

    def data_received(self, data: bytes) -> None:
        parts = (self.buf + data).split(b"\n")
        self.buf = parts.pop()
        loads = json.loads
        v = 0
        for line in parts:
            v += len(loads(line))
        self.values += v
        self.n += len(parts)
        if self.n >= self.want and not self.done.done():
            self.done.set_result(None)


class _BareCsv(_BareLines):
    header: list[str] | None = None

    def data_received(self, data: bytes) -> None:
        parts = (self.buf + data).split(b"\n")
        self.buf = parts.pop()
        v = 0
        rows = csv.reader([line.decode() for line in parts])
        if self.header is None:
            self.header = next(rows, None)  # the first line names the columns
        for row in rows:
            v += len([float(cell) for cell in row])
            self.n += 1
        self.values += v
        if self.n >= self.want and not self.done.done():
            self.done.set_result(None)


class _BareFrames(_BareLines):
    unpack = struct.Struct("<IhHIH").unpack

    def data_received(self, data: bytes) -> None:
        parts = (self.buf + data).split(b"\x00")
        self.buf = parts.pop()
        unpack = self.unpack
        v = 0
        crc = binascii.crc_hqx
        for frame in parts:
            body = cobs_decode(frame)
            if crc(body[:-2], 0xFFFF) != int.from_bytes(body[-2:], "little"):
                raise ValueError("CRC mismatch")
            v += len(unpack(body[:-2]))
        self.values += v
        self.n += len(parts)
        if self.n >= self.want and not self.done.done():
            self.done.set_result(None)


async def run_bare(kind: str, blob: bytes, pieces: int, blobfile: Path) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    cls = {"json": _BareLines, "csv": _BareCsv}.get(kind, _BareFrames)
    with PtyDevice() as dev:
        transport, proto = await create_serial_connection(loop, lambda: cls(pieces, done), dev.path, baudrate=BAUD)
        set_read_size(transport, READ_SIZE)  # as the serial source does: the same reads on both sides
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            writer = await start_writer(dev, blobfile)
            await asyncio.wait_for(done, 120)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            await asyncio.wait_for(writer.wait(), 30)
        finally:
            transport.close()
            await asyncio.sleep(0.05)  # the transport closes the fd on the loop's next turns
    return {"pieces": proto.n, "readings": proto.values, "wall_s": wall, "cpu_s": cpu}


# --- sluice -------------------------------------------------------------------------------


class _CountOptions(NodeOptions):
    type: Literal["bench_serial_count"]


class _Count(Sink):
    Options = _CountOptions
    n = 0
    want = 0
    done: asyncio.Future[None] | None = None

    async def write(self, batch: list[Event]) -> None:
        c = type(self)
        c.n += len(batch)
        if c.n >= c.want and c.done is not None and not c.done.done():
            c.done.set_result(None)


async def run_sluice(codec: Any, per_piece: int, pieces: int, blobfile: Path, tmp: Path) -> dict[str, Any]:
    register(_Count)
    loop = asyncio.get_running_loop()
    _Count.n, _Count.want, _Count.done = 0, pieces * per_piece, loop.create_future()
    dl = DeadLetters(None)
    with PtyDevice() as dev:
        opts = [
            SerialOptions(id="dev", type="serial", port=dev.path, baud=BAUD, codec=codec),
            _CountOptions(id="out", type="bench_serial_count", input=["dev"]),
        ]
        p = Pipeline("p", opts, lambda nid: NodeContext("bench", "p", nid, str(tmp), None, dl))
        src = p.nodes[p.index["dev"]]
        task = asyncio.create_task(p.run())
        deadline = time.monotonic() + 10
        while src._transport is None:  # the port opens in the source's task
            if time.monotonic() > deadline:
                raise SystemExit(f"the serial source did not open {dev.path}: {src.health()}")
            await asyncio.sleep(0.005)
        t0, c0 = time.perf_counter(), time.process_time()
        writer = await start_writer(dev, blobfile)
        await asyncio.wait_for(_Count.done, 120)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        await asyncio.wait_for(writer.wait(), 30)
        p.stop()
        await task
    return {
        "pieces": src._decoder.stats["pieces"],
        "readings": _Count.n,
        "wall_s": wall,
        "cpu_s": cpu,
        "malformed": src.n_malformed,
        "pauses": src.n_pauses,
    }


def decoder_only(codec: Any, blob: bytes, pieces: int) -> float:
    """The codec's decoder alone, in memory, fed 4 KiB reads: pieces per CPU second (attribution)."""
    dec = make_decoder(codec)
    chunks = [blob[i : i + 4096] for i in range(0, len(blob), 4096)]
    c0 = time.process_time()
    for c in chunks:
        dec.feed(c)
    return pieces / (time.process_time() - c0)


async def bench_codec(kind: str, n: int, repeat: int, tmp: Path) -> dict[str, Any]:
    codec = {"json": JSON_CODEC, "csv": CSV_CODEC, "cobs": COBS_CODEC}[kind]
    per_piece = 5  # numeric fields per record that become readings (json, csv: ts is the event time)
    blob = encode(codec, records(n))
    blobfile = tmp / f"{kind}.bin"
    blobfile.write_bytes(blob)
    best: dict[str, dict[str, Any]] = {}
    for r in range(repeat):
        for subject in ("bare", "sluice", "record"):
            log(f"{kind}: {subject} run {r + 1}/{repeat}, {n} pieces ({len(blob) / n:.0f} bytes each) ...")
            if subject == "bare":
                res = await run_bare(kind, blob, n, blobfile)
            elif subject == "sluice":
                res = await run_sluice(codec, per_piece, n, blobfile, tmp)
            else:
                res = await run_sluice(codec.model_copy(update={"record": "dev"}), 1, n, blobfile, tmp)
            res["per_cpu_s"] = res["pieces"] / res["cpu_s"]
            res["per_wall_s"] = res["pieces"] / res["wall_s"]
            if subject not in best or res["per_cpu_s"] > best[subject]["per_cpu_s"]:
                best[subject] = res
    decoder = max(decoder_only(codec, blob, n) for _ in range(repeat))
    return {"bytes_per_piece": len(blob) / n, "decoder_per_cpu_s": decoder, **best}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="lines (json, csv) and frames (cobs) per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per subject, alternating; the best counts")
    ap.add_argument("--quick", action="store_true", help="45,000 pieces, 2 runs each (three codecs in under 30 s)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeat = 45_000, 2
    t_start = time.perf_counter()
    settle_heap()  # as the gateway does once it runs
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-serial-") as tmp:
        for kind in ("json", "csv", "cobs"):
            results[kind] = await bench_codec(kind, args.n, args.repeat, Path(tmp))
    print(f"serial decode: {args.n:,} pieces per run, best of {args.repeat}; reads of up to {READ_SIZE:,} bytes")
    print(f"{'codec':<6} {'subject':<8} {'pieces/s cpu':>13} {'pieces/s wall':>14} {'readings':>10}  ratio")
    out: dict[str, Any] = {
        "bench": "serial_decode",
        "ratio": None,
        "n": args.n,
        "repeat": args.repeat,
        "read_size": READ_SIZE,
    }
    ratios = []
    per_field = []
    for kind, res in results.items():
        ratio = res["record"]["per_cpu_s"] / res["bare"]["per_cpu_s"]
        pf = res["sluice"]["per_cpu_s"] / res["bare"]["per_cpu_s"]
        ratios.append(ratio)
        per_field.append(pf)
        for subject in ("bare", "sluice", "record"):
            s = res[subject]
            tail = ""
            if subject == "record":
                tail = f"  {ratio:.2f} (goal >= {GOAL_RATIO})"
            elif subject == "sluice":
                tail = f"  {pf:.2f} (five events per piece)"
            print(f"{kind:<6} {subject:<8} {s['per_cpu_s']:>13.0f} {s['per_wall_s']:>14.0f} {s['readings']:>10}{tail}")
            out[f"{kind}_{subject}_per_cpu_s"] = round(s["per_cpu_s"])
            out[f"{kind}_{subject}_per_wall_s"] = round(s["per_wall_s"])
            out[f"{kind}_{subject}_readings"] = s["readings"]
        dec = res["decoder_per_cpu_s"]
        print(f"{kind:<6} {'decoder':<8} {dec:>13.0f} {'':>14} {'':>10}  (the codec's decoder alone, in memory)")
        out[f"{kind}_decoder_only_per_cpu_s"] = round(dec)
        out[f"{kind}_ratio"] = round(ratio, 3)
        out[f"{kind}_per_field_ratio"] = round(pf, 3)
        out[f"{kind}_ratio_wall"] = round(res["record"]["per_wall_s"] / res["bare"]["per_wall_s"], 3)
        out[f"{kind}_bytes_per_piece"] = round(res["bytes_per_piece"], 1)
        out[f"{kind}_sluice_malformed"] = res["sluice"]["malformed"]
        out[f"{kind}_sluice_pauses"] = res["sluice"]["pauses"]
    out["per_field_ratio"] = round(min(per_field), 3)
    out["ratio"] = round(min(ratios), 3)
    out["goal_met"] = out["ratio"] >= GOAL_RATIO
    out["quick"] = args.quick
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
