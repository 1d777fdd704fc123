#!/usr/bin/env python3
"""Window benchmark: a keyed tumbling 10 s mean over 1,000 keys, Sluice with persistence vs a plain dict.

Subjects, back to back on the same pre-built stream of N readings (1,000 keys, event time moving
one reading per key per second of event time, up to 0.5 s out of order):

- ``dict``: a plain Python dict-of-[sum, count] keyed by (key, window start), closing windows as
  event time passes them: the floor for an in-memory aggregation in Python;
- ``node``: the ``window`` node's ``on_event`` alone, in a loop (no engine, no store);
- ``sluice``: the real pipeline (source → window → sink) through the engine with the state
  store on: checkpoints every second, group commits to ``state.db`` in its writer thread.

Reported: readings/s per subject (CPU time of the process, best of several runs, so other load
on the machine matters less), the CPU cost of one checkpoint with every key changed, ``ratio`` =
sluice ÷ dict with that cost taken out of each second (checkpoints run at most once a second;
goal ≥ 0.5), bytes of stored state per open key, and the store's commit latency p50/p99. Ends
with one JSON line.

With ``--sweep``: the same pipeline at 1k / 10k / 100k keys (CPU per reading, checkpoint CPU
with every key and with 1 % of the keys changed, bytes per key, RSS). Bytewax, when installed,
runs the same keyed tumbling event-time mean as an outside baseline (skipped with a message
otherwise).

    .venv/bin/python scripts/bench/window_state.py [--quick] [--sweep] [--n N] [--keys K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.deadletter import DeadLetters  # noqa: E402  # after the path set-up above
from gateway.engine import Pipeline, SourceQueue  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.node import NodeContext, NodeOptions, Sink, Source, register  # noqa: E402
from gateway.runtime import settle_heap  # noqa: E402
from gateway.store import StateStore  # noqa: E402
from nodes.windows import Window, WindowOptions  # noqa: E402

SIZE = 10.0


def stream(n: int, keys: int, seed: int = 1) -> list[Event]:
    rnd = random.Random(seed)
    names = [f"sensor/{i:04d}" for i in range(keys)]
    t0 = 1_700_000_000.0
    out = []
    for i in range(n):
        # every key reads once per second of event time; up to 0.5 s out of order
        ts = t0 + i / keys - rnd.random() * 0.5
        out.append(Event(names[i % keys], ts, 20.0 + rnd.random() * 10, "bench"))
    return out


def run_dict(events: list[Event]) -> tuple[float, int]:
    """The baseline: plain dict aggregation with the same closing rule (watermark = max ts)."""
    t0 = time.process_time()
    open_: dict[tuple[str, float], list[float]] = {}
    by_start: dict[float, list[tuple[str, float]]] = {}
    wm = -math.inf
    emitted = 0
    results = []
    floor = math.floor
    for ev in events:
        ts = ev.ts
        start = floor(ts / SIZE) * SIZE
        if start + SIZE <= wm:
            continue
        k = (ev.key, start)
        acc = open_.get(k)
        if acc is None:
            open_[k] = [ev.value, 1.0]
            by_start.setdefault(start, []).append(k)
        else:
            acc[0] += ev.value
            acc[1] += 1.0
        if ts > wm:
            wm = ts
            for s in [s for s in by_start if s + SIZE <= wm]:
                for key in by_start.pop(s):
                    acc = open_.pop(key)
                    results.append((key[0], s, acc[0] / acc[1]))
                    emitted += 1
    return time.process_time() - t0, emitted


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _ctx(node_id: str, tmp: Path, dl: DeadLetters) -> NodeContext:
    return NodeContext("bench", "p", node_id, str(tmp), None, dl)


def run_node(events: list[Event], tmp: Path) -> tuple[float, int]:
    dl = DeadLetters(None)
    w = Window(WindowOptions(id="w", type="window", kind="tumbling", size=SIZE, aggregate="mean"), _ctx("w", tmp, dl))
    t0 = time.process_time()
    emitted = len(w.process_batch(events))
    return time.process_time() - t0, emitted


class _SrcOptions(NodeOptions):
    type: Literal["bench_windows_src"]


class _Src(Source):
    Options = _SrcOptions
    events: list[Event] = []

    async def run(self, output: SourceQueue) -> None:
        evs = self.events
        for i in range(0, len(evs), 500):
            await output.put(evs[i : i + 500])


class _SinkOptions(NodeOptions):
    type: Literal["bench_windows_sink"]


class _Sink(Sink):
    Options = _SinkOptions

    async def write(self, batch: list[Event]) -> None:
        pass


async def run_sluice(events: list[Event], tmp: Path) -> dict[str, Any]:
    register(_Src)
    register(_Sink)
    _Src.events = events
    store = StateStore(tmp / "state.db")
    await store.start()
    dl = DeadLetters(None)
    opts = [
        _SrcOptions(id="src", type="bench_windows_src"),
        WindowOptions(id="avg", type="window", input=["src"], kind="tumbling", size=SIZE, aggregate="mean"),
        _SinkOptions(id="out", type="bench_windows_sink", input=["avg"]),
    ]
    p = Pipeline("p", opts, lambda nid: _ctx(nid, tmp, dl), store=store)
    win = p.nodes[p.index["avg"]]
    t0 = time.process_time()  # CPU of the whole process: the store's writer thread counts too
    task = asyncio.create_task(p.run())
    # Done when the window has taken every reading: counting input, not waiting for a sink
    # write, which never comes when no window closes in the last batch (10k keys and more).
    while win.n_in < len(events):
        if task.done():
            task.result()
            raise RuntimeError("the pipeline stopped before it took every reading")
        await asyncio.sleep(0.01)
    elapsed = time.process_time() - t0
    checkpoints = p.checkpointer.checkpoints if p.checkpointer else 0
    rss_kib = _rss_kib()
    # The run is shorter than the checkpoint interval (1 s), so price a checkpoint on its own:
    # every key changed (the worst case) and 1 % of the keys changed, snapshot + diff + JSON +
    # group commit, CPU of the process.
    ckpt = p.checkpointer
    assert ckpt is not None
    last_ts = max(e.ts for e in events[-2000:])
    keys = sorted({e.key for e in events})
    costs: dict[str, list[float]] = {"all": [], "few": []}
    for r in range(6):
        which = "all" if r % 2 == 0 else "few"
        changed = keys if which == "all" else keys[::100]  # 1 %
        win.process_batch([Event(k, last_ts + 0.001 * (r + 1), 1.0, "bench") for k in changed])
        t1 = time.process_time()
        ckpt.commit(ckpt.take())
        await store.flush()
        costs[which].append(time.process_time() - t1)
    p.stop()
    await task
    await store.close()
    db = sqlite3.connect(tmp / "state.db")
    try:
        rows = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(value) + LENGTH(key)), 0) FROM state "
            "WHERE node = 'avg' AND key LIKE '.k:%'"
        ).fetchone()
    finally:
        db.close()
    h = store.health()
    return {
        "elapsed": elapsed,
        "emitted": win.n_out,
        "checkpoints_while_running": checkpoints,
        "open_keys": rows[0],
        "bytes_per_key": rows[1] / rows[0] if rows[0] else None,
        "commit_p50_ms": (h["commit_p50"] or 0) * 1000,
        "commit_p99_ms": (h["commit_p99"] or 0) * 1000,
        "commits": h["commits"],
        "checkpoint_ms": min(costs["all"]) * 1000,
        "checkpoint_few_ms": min(costs["few"]) * 1000,
        "few_keys": len(keys[::100]),
        "rss_mib": rss_kib / 1024,
    }


def run_bytewax(events: list[Event]) -> tuple[float, int] | str:
    """The same keyed 10 s tumbling event-time mean in Bytewax (Rust core, Python API), in this
    process: (CPU seconds, windows emitted), or why it was skipped."""
    try:
        import bytewax.operators as op
        import bytewax.operators.windowing as win
        from bytewax.dataflow import Dataflow
        from bytewax.operators.windowing import EventClock, TumblingWindower
        from bytewax.testing import TestingSink, TestingSource, run_main
    except ImportError as exc:
        return f"bytewax is not installed ({exc.name}); `pip install bytewax` to compare"
    from datetime import UTC, datetime, timedelta

    items = [(e.key, datetime.fromtimestamp(e.ts, UTC), e.value) for e in events]
    out: list[Any] = []
    flow = Dataflow("window_state")
    stream_ = op.input("in", flow, TestingSource(items, batch_size=500))
    keyed = op.key_on("key", stream_, lambda x: x[0])
    clock = EventClock(lambda x: x[1], wait_for_system_duration=timedelta(0))
    windower = TumblingWindower(length=timedelta(seconds=SIZE), align_to=datetime(2023, 1, 1, tzinfo=UTC))

    def add(acc: list[float], x: Any) -> list[float]:
        acc[0] += x[2]
        acc[1] += 1.0
        return acc

    def merge(a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1]]

    folded = win.fold_window("mean", keyed, clock, windower, lambda: [0.0, 0.0], add, merge)
    means = op.map_value("div", folded.down, lambda w: (w[0], w[1][0] / w[1][1]))
    op.output("out", means, TestingSink(out))
    t0 = time.process_time()
    run_main(flow)
    return time.process_time() - t0, len(out)


def sweep(quick: bool) -> dict[str, Any]:
    """1k / 10k / 100k keys, 12 readings per key (each key closes one window): CPU per reading
    through the pipeline with the state store on, checkpoint CPU (every key / 1 % changed),
    bytes of state per key, RSS of the process."""
    rows = []
    print()
    print("key-count sweep: 12 readings per key, source -> window -> sink with the state store on")
    head = (
        f"{'keys':>8} {'readings':>10} {'µs/reading':>11} {'ckpt all ms':>12} {'ckpt 1% ms':>11} "
        f"{'B/key':>6} {'RSS MiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for keys in (1_000, 10_000, 100_000):
        events = stream(12 * keys, keys)
        settle_heap()
        best: dict[str, Any] = {}
        for _ in range(1 if quick or keys >= 100_000 else 2):
            with tempfile.TemporaryDirectory(prefix="sluice-bench-windows-") as tmp:
                r = asyncio.run(run_sluice(events, Path(tmp)))
            if not best or r["elapsed"] < best["elapsed"]:
                best = r
        row = {
            "keys": keys,
            "n": len(events),
            "us_per_reading": best["elapsed"] * 1e6 / len(events),
            "checkpoint_all_ms": best["checkpoint_ms"],
            "checkpoint_1pct_ms": best["checkpoint_few_ms"],
            "bytes_per_key": best["bytes_per_key"],
            "rss_mib": best["rss_mib"],
        }
        rows.append(row)
        print(
            f"{keys:>8,} {len(events):>10,} {row['us_per_reading']:>11.2f} {row['checkpoint_all_ms']:>12.1f} "
            f"{row['checkpoint_1pct_ms']:>11.2f} {row['bytes_per_key'] or 0:>6.0f} {row['rss_mib']:>8.1f}"
        )
        del events
    print(
        "checkpoint CPU per second = one checkpoint's cost (interval 1 s); a checkpoint that costs more "
        "than 10 % of its interval spaces the next ones out"
    )
    return {"sweep": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_500_000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5, help="runs per subject; the best CPU time counts")
    ap.add_argument("--quick", action="store_true", help="N = 600,000, 5 runs each (well under 30 s)")
    ap.add_argument("--sweep", action="store_true", help="also the 1k / 10k / 100k key-count sweep")
    ap.add_argument(
        "--bytewax-n",
        type=int,
        default=None,
        help="readings for the Bytewax baseline (default: N; 100,000 with --quick); 0 skips it",
    )
    args = ap.parse_args()
    n, repeat = (600_000, 5) if args.quick else (args.n, args.repeat)
    events = stream(n, args.keys)
    # as the gateway does once running; the pre-made input is fixture data (outside the process
    # in real use), so it is left out of the collector's walks for every subject alike
    settle_heap()
    d_time = n_time = math.inf
    s: dict[str, Any] = {}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="sluice-bench-windows-") as tmp:
            t, d_emitted = run_dict(events)
            d_time = min(d_time, t)
            t, n_emitted = run_node(events, Path(tmp))
            n_time = min(n_time, t)
            r = asyncio.run(run_sluice(events, Path(tmp)))
            if not s or r["elapsed"] < s["elapsed"]:
                s = r
    bw_n = args.bytewax_n if args.bytewax_n is not None else (100_000 if args.quick else n)
    bw: tuple[float, int] | str = "--bytewax-n 0" if bw_n <= 0 else run_bytewax(events[:bw_n])
    rate = {"dict": n / d_time, "node": n / n_time, "sluice": n / s["elapsed"]}
    print(f"window benchmark: {n:,} readings, {args.keys} keys, tumbling {SIZE:g}s mean; CPU time, best of {repeat}")
    print(f"{'subject':<8} {'readings/s':>12} {'µs/reading':>11} {'windows':>9}")
    for name, emitted in (("dict", d_emitted), ("node", n_emitted), ("sluice", s["emitted"])):
        print(f"{name:<8} {rate[name]:>12,.0f} {1e6 / rate[name]:>11.2f} {emitted:>9,}")
    if isinstance(bw, str):
        print(f"bytewax  skipped: {bw}")
        bytewax_us = None
    else:
        bytewax_us = bw[0] * 1e6 / bw_n
        print(
            f"{'bytewax':<8} {1e6 / bytewax_us:>12,.0f} {bytewax_us:>11.2f} {bw[1]:>9,}"
            f"   (first {bw_n:,} readings, once)"
        )
    # with persistence: at full load one checkpoint a second takes its CPU time out of every second
    ratio = rate["sluice"] * (1 - s["checkpoint_ms"] / 1000) / rate["dict"]
    print(
        f"ratio sluice (with persistence)/dict: {ratio:.2f} (goal >= 0.5); "
        f"node alone/dict: {rate['node'] / rate['dict']:.2f}"
        + (f"; bytewax/sluice CPU per reading: {bytewax_us * rate['sluice'] / 1e6:.1f}" if bytewax_us else "")
    )
    print(
        f"state: {s['open_keys']} open keys, {s['bytes_per_key'] or 0:.0f} bytes per key; "
        f"a checkpoint with every key changed costs {s['checkpoint_ms']:.1f} ms CPU, with 1 % changed "
        f"{s['checkpoint_few_ms']:.2f} ms (at most one a second); "
        f"{s['commits']} commits, p50 {s['commit_p50_ms']:.2f} ms, p99 {s['commit_p99_ms']:.2f} ms"
    )
    del events
    extra = sweep(args.quick) if args.sweep else {}
    print(
        json.dumps(
            {
                "bench": "window_state",
                "n": n,
                "keys": args.keys,
                "ratio": round(ratio, 3),
                "node_ratio": round(rate["node"] / rate["dict"], 3),
                "dict_per_s": round(rate["dict"]),
                "node_per_s": round(rate["node"]),
                "sluice_per_s": round(rate["sluice"]),
                "bytewax_us_per_reading": round(bytewax_us, 2) if bytewax_us else None,
                "bytewax_skipped": bw if isinstance(bw, str) else None,
                "vs_bytewax": round(bytewax_us * rate["sluice"] / 1e6, 2) if bytewax_us else None,
                "bytes_per_key": s["bytes_per_key"],
                "commit_p50_ms": round(s["commit_p50_ms"], 3),
                "commit_p99_ms": round(s["commit_p99_ms"], 3),
                "checkpoint_ms": round(s["checkpoint_ms"], 2),
                "checkpoint_1pct_ms": round(s["checkpoint_few_ms"], 3),
                "checkpoints_while_running": s["checkpoints_while_running"],
                **extra,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
