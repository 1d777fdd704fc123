#!/usr/bin/env python3
"""Crash test for window state: SIGKILL a gateway mid-stream, restart it, compare with one clean run.

A child gateway replays a fixed stream of readings (a source that checkpoints its read offset,
like an MQTT QoS 1 persistent session) through a tumbling and a session window into a JSON-lines
file, and says on its stdout how far its source has read. Each round the parent picks a point in
the stream (spread over it, seeded), waits until the child has read that far, stops it (SIGSTOP),
checks that the kill would land where it tests something — a checkpoint committed by this run
(the next restores from it), readings past it (the restart must read them again) and input
left — and kills it (SIGKILL; otherwise it lets the child go on to its next batch and checks
again). After
every kill ``state.db`` must pass ``PRAGMA quick_check``. At the end the results are compared with
a run that was never interrupted: every window result of the crashed run must be one the clean
run produced, none may be missing (a result may repeat: output is at-least-once), and the windows
still open at the end must hold the same state. Where each kill lands is observed, not timed, so
a slow or busy machine changes nothing.

    .venv/bin/python scripts/crash_windows.py              # 50 rounds
    .venv/bin/python scripts/crash_windows.py --rounds 3 --quick
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
BATCH = 20  # readings the source hands over at a time
sys.path.insert(0, str(ROOT))


# --- the child: a gateway with a replayable file source and a JSON-lines sink -------------------


def child(args: argparse.Namespace) -> int:
    from pydantic import Field

    from gateway.config import parse_config
    from gateway.engine import SourceQueue
    from gateway.events import Event
    from gateway.node import NodeContext, NodeOptions, Sink, Source, register
    from gateway.runtime import Gateway

    class FileOptions(NodeOptions):
        type: Literal["crash_file"]
        path: str
        batch: int = BATCH
        rate: float = Field(4000.0, description="readings per second")

    @register
    class FileSource(Source):
        """Reads [key, ts, value] lines from the offset it last checkpointed."""

        Options = FileOptions
        options: FileOptions

        def __init__(self, options: FileOptions, ctx: NodeContext):
            super().__init__(options, ctx)
            self.offset = 0
            self.total = 0

        def snapshot(self) -> Any:
            return self.offset

        def restore(self, state: Any) -> None:
            self.offset = int(state)

        async def run(self, output: SourceQueue) -> None:
            lines = await asyncio.to_thread(_read_lines, self.options.path)
            self.total = len(lines)
            i = self.offset
            while i < len(lines):
                j = min(len(lines), i + self.options.batch)
                batch = [Event(k, t, v, self.id) for k, t, v in map(json.loads, lines[i:j])]
                await output.put(batch)
                self.offset = i = j  # handed over; no await since put returned, so a barrier sees this
                print(j, flush=True)  # how far it has read, for the parent to kill at a point it chose
                await asyncio.sleep(len(batch) / self.options.rate)

    class JsonlOptions(NodeOptions):
        type: Literal["crash_jsonl"]
        path: str

    @register
    class JsonlSink(Sink):
        Options = JsonlOptions
        options: JsonlOptions

        async def start(self) -> None:
            self.f = await asyncio.to_thread(_open_for_append, self.options.path)

        async def write(self, batch: list[Event]) -> None:
            for e in batch:
                self.f.write(
                    json.dumps({"node": e.source, "key": e.key, "ts": e.ts, "value": e.value}, sort_keys=True) + "\n"
                )
            self.f.flush()

        async def close(self) -> None:
            self.f.close()

    text = f"""\
gateway: {{id: crash, data_dir: {json.dumps(args.data_dir)}, log_level: warning}}
console: {{enabled: false}}
pipelines:
  - name: p
    nodes:
      - {{id: src, type: crash_file, path: {json.dumps(args.input)}, rate: {args.rate}}}
      - {{id: tumbling, type: window, input: src, kind: tumbling, size: 5s, allowed_lateness: 3s,
         aggregate: [mean, count, p90, first, last]}}
      - {{id: session, type: window, input: src, kind: session, gap: 4s, allowed_lateness: 2s,
         aggregate: [count, sum, max]}}
      - {{id: out, type: crash_jsonl, input: [tumbling, session], path: {json.dumps(args.out)}}}
"""

    async def main() -> dict[str, Any]:
        gw = Gateway(parse_config(text, "crash.yaml", env={}))
        task = asyncio.create_task(gw.run(install_signals=False))
        p = gw.pipelines["p"]
        src = p.nodes[p.index["src"]]
        while not task.done():
            if p.source_state.get("src") == "finished" and src.offset == src.total and p.queue.depth == 0:
                gw.stop()
                break
            await asyncio.sleep(0.05)
        await task
        return {n: p.nodes[p.index[n]].snapshot() for n in ("tumbling", "session")}

    state = asyncio.run(main())
    Path(args.state).write_text(json.dumps(state, sort_keys=True))
    return 0


def _read_lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines()


def _open_for_append(path: str) -> Any:
    p = Path(path)
    if p.exists():
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):  # a line torn by the kill
            p.write_bytes(data[: data.rfind(b"\n") + 1])
    return p.open("a", encoding="utf-8")


# --- the parent ----------------------------------------------------------------------------


def make_input(path: Path, n: int, seed: int) -> None:
    rnd = random.Random(seed)
    t = 1_700_000_000.0
    with path.open("w") as f:
        for _ in range(n):
            t += rnd.expovariate(1 / 0.05) if rnd.random() > 0.002 else rnd.uniform(5, 15)  # bursts and pauses
            late = rnd.choice([0.0, 0.0, 0.0, 0.5, 2.0, 6.0])
            f.write(json.dumps([f"s{rnd.randrange(12)}", round(t - late, 3), round(rnd.gauss(20, 5), 2)]) + "\n")


def spawn(work: Path, run: str, input_path: Path, rate: float) -> subprocess.Popen[bytes]:
    d = work / run
    d.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--data-dir",
        str(d / "data"),
        "--input",
        str(input_path),
        "--out",
        str(d / "out.jsonl"),
        "--state",
        str(d / "state.json"),
        "--rate",
        str(rate),
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Progress:
    """The offsets a child prints as its source hands batches over, read without blocking forever."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.read = 0
        self.ended = False

    def _take(self, data: bytes) -> None:
        if not data:
            self.ended = True
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            self.read = max(self.read, int(line))

    def wait_past(self, offset: int, timeout: float = 60.0) -> bool:
        """Read until the child says it read more than ``offset``; False if it ended first."""
        while self.read <= offset and not self.ended:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise SystemExit(f"the child said nothing for {timeout:.0f}s (last offset {self.read})")
            self._take(os.read(self.fd, 65536))
        return self.read > offset

    def drain(self) -> None:
        """What a stopped child wrote before it stopped."""
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 65536)
            self._take(data)
            if not data:
                return


def saved_offset(db: Path) -> int:
    """The source's read offset in the last checkpoint committed to ``db`` (0 before the first)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM state WHERE pipeline='p' AND node='src' AND key='='").fetchone()
    except sqlite3.OperationalError:  # no table yet
        row = None
    finally:
        con.close()
    return 0 if row is None else int(json.loads(row[0]))


def kill_at(
    proc: subprocess.Popen[bytes], point: int, start: int, events: int, db: Path, batch: int
) -> tuple[int, int]:
    """Kill ``proc`` once its source has read past ``point``, at a moment observed to have a
    checkpoint of its own (past ``start``, where it was restored from), readings past that
    checkpoint and input left. Returns (offset read, offset checkpointed) at the kill."""
    progress = Progress(proc)
    offset = point
    while True:
        if not progress.wait_past(offset):
            raise SystemExit(f"the child ended before it read past {offset} of {events} readings")
        os.kill(proc.pid, signal.SIGSTOP)
        progress.drain()
        read, saved = progress.read, saved_offset(db)
        # the child may have handed one more batch over than it said before it stopped
        if read + batch >= events:
            os.kill(proc.pid, signal.SIGKILL)
            raise SystemExit(f"no kill point left before the end of the input ({read} of {events} read)")
        if start < saved < read:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
            return read, saved
        os.kill(proc.pid, signal.SIGCONT)  # no checkpoint yet, or it just caught up: after the next batch
        offset = read


def quick_check(db: Path) -> str:
    if not db.exists():
        return "ok"
    con = sqlite3.connect(db)
    try:
        rows = con.execute("PRAGMA quick_check").fetchall()
    finally:
        con.close()
    return "; ".join(r[0] for r in rows)


def finish(proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"{what}: did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise SystemExit(f"{what}: exit {proc.returncode}\n{err.decode(errors='replace')[-3000:]}")


def parent(args: argparse.Namespace) -> int:
    rnd = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="sluice-crash-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        input_path = work / "input.jsonl"
        make_input(input_path, args.events, args.seed)

        t0 = time.monotonic()
        finish(spawn(work, "clean", input_path, args.rate), "clean run", 300)
        clean_time = time.monotonic() - t0
        print(f"clean run: {args.events} readings in {clean_time:.1f}s")

        # the kill points: spread evenly over the stream, each moved by up to a third of the gap
        # (seeded), so they fall anywhere between two checkpoints
        gap = args.events / (args.rounds + 1)
        points = [int(gap * (r + 1 + rnd.uniform(-1 / 3, 1 / 3))) for r in range(args.rounds)]
        killed = 0
        state_db = work / "crashed" / "data" / "state.db"
        for r, point in enumerate(points):
            start = saved_offset(state_db)
            proc = spawn(work, "crashed", input_path, args.rate)
            try:
                read, saved = kill_at(proc, point, start, args.events, state_db, BATCH)
            except SystemExit as exc:
                proc.kill()
                _, err = proc.communicate()
                raise SystemExit(f"round {r + 1}: {exc}\n{err.decode(errors='replace')[-3000:]}") from None
            killed += 1
            if proc.stderr:
                proc.stderr.close()
            check = quick_check(state_db)
            print(
                f"round {r + 1}/{args.rounds}: restored at {start}, killed at reading {read} of {args.events} "
                f"({read - saved} past the checkpoint at {saved}); quick_check: {check}"
            )
            if check != "ok":
                print("FAIL: the state database is damaged after a SIGKILL", file=sys.stderr)
                return 1
        finish(spawn(work, "crashed", input_path, args.rate), "final run", 300)

        def lines(run: str) -> list[str]:
            return (work / run / "out.jsonl").read_text().splitlines()

        clean, crashed = lines("clean"), lines("crashed")
        clean_set, crashed_set = set(clean), set(crashed)
        wrong = crashed_set - clean_set
        missing = clean_set - crashed_set
        state_same = (work / "clean" / "state.json").read_text() == (work / "crashed" / "state.json").read_text()
        print(
            f"{killed} kills; results: clean {len(clean)}, crashed {len(crashed)} "
            f"({len(crashed) - len(crashed_set)} repeated), wrong {len(wrong)}, missing {len(missing)}; "
            f"open windows equal: {state_same}"
        )
        ok = not wrong and not missing and state_same and len(clean) == len(clean_set)
        if not ok:
            for line in sorted(wrong)[:5]:
                print("  wrong:  ", line, file=sys.stderr)
            for line in sorted(missing)[:5]:
                print("  missing:", line, file=sys.stderr)
        if args.workdir is None and not ok:
            kept = Path(tempfile.mkdtemp(prefix="sluice-crash-kept-"))
            for run in ("clean", "crashed"):
                for name in ("out.jsonl", "state.json"):
                    src = work / run / name
                    if src.exists():
                        (kept / f"{run}-{name}").write_bytes(src.read_bytes())
            print(f"outputs kept in {kept}", file=sys.stderr)
        print(json.dumps({"crash": "windows", "rounds": args.rounds, "kills": killed, "ok": ok}))
        return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument(
        "--events",
        type=int,
        help="readings in the stream; default: rounds x rate x 2 s (two checkpoints' worth of reading "
        "between two kill points: each round is killed after a checkpoint of its own)",
    )
    ap.add_argument("--rate", type=float, default=4000.0, help="readings per second the source replays")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", help="keep everything here instead of a temporary directory")
    ap.add_argument("--quick", action="store_true", help="a small stream (for CI): 4,000 readings")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.events = min(args.events or 4000, 4000)
    if args.events is None:
        args.events = int(args.rounds * args.rate * 2)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
