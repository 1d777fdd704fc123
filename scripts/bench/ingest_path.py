#!/usr/bin/env python3
"""The per-reading path in process, without sockets: what one reading of the realistic MQTT flow
costs each stage, from the payload to the threshold.

The nodes are those of ``mqtt_ingest.py``'s realistic config, built by a real ``Gateway`` (not
started): the MQTT source's batch decode (``decode_many``) -> ``filter`` -> ``map`` -> a 10 s
tumbling mean per key -> ``threshold``, over the benchmark's own readings (100 keys, one every
2.5 s of event time each) as ``(topic, payload)`` pairs in batches of 500, as the MQTT read loop
hands them over; no sink (the alerts' cost is ``alert_path.py``'s). The heap is settled first as a
running gateway does (``gc.freeze`` of what start-up built, young collections spaced out). A
stage's figure is the CPU per reading with the chain cut after it minus the chain cut before it;
the floor is msgspec decoding the same payloads into dicts.

  .venv/bin/python scripts/bench/ingest_path.py [--n 100000] [--quick]

Instructions instead of time (stable under load to ~1 %): run the role twice per stage under
callgrind and take the difference, e.g.
  valgrind --tool=callgrind .venv/bin/python scripts/bench/ingest_path.py --role run --upto window --n 2000
  valgrind --tool=callgrind .venv/bin/python scripts/bench/ingest_path.py --role run --upto window --n 12000
  (total instructions of the second minus the first) / 10,000 = instructions per reading up to
  that stage (``--upto none`` measures the harness alone: generating the payloads)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

STAGES = ("none", "decode", "filter", "map", "window", "threshold")
BATCH = 500
KEYS = 100


def messages(n: int) -> list[tuple[str, bytes]]:
    """The benchmark publisher's readings as the MQTT read loop hands them over."""
    import mqtt_ingest as mi

    readings = mi.gen_realistic(n, KEYS, mi.realistic_base(n, KEYS))
    topics = [f"bench/{mi.key_name(k)}/temp" for k in range(KEYS)]
    return [(topics[k], b'{"ts": %.3f, "value": %s}' % (ts, repr(v).encode())) for k, ts, v in readings]


def run(n: int, upto: str) -> tuple[float, int]:
    """CPU seconds of ``n`` readings through the chain cut after ``upto``, and what came out."""
    import mqtt_ingest as mi

    from gateway.config import parse_config
    from gateway.runtime import Gateway, release_heap, settle_heap

    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(parse_config(mi.sluice_config("realistic", 1883, Path(tmp), 0, 0), "bench.yaml", {}))
        p = gw.pipelines["bench"]
        src, *chain = (p.nodes[p.index[i]] for i in ("temp", "valid", "fahrenheit", "mean", "hot"))
        chain = chain[: max(0, STAGES.index(upto) - 1)]
        msgs = messages(n)
        settle_heap()
        out = 0
        t0 = time.process_time()
        if upto != "none":
            for i in range(0, n, BATCH):
                events = src.decode_many(msgs[i : i + BATCH])
                for node in chain:
                    events = node.process_batch(events)
                out += len(events)
        cpu = time.process_time() - t0
        release_heap(stopping=True)
    return cpu, out


def floor(n: int) -> float:
    """msgspec decoding the same payloads into dicts, the least a Python subscriber does."""
    import msgspec

    decode = msgspec.json.decode
    msgs = messages(n)
    t0 = time.process_time()
    for i in range(0, n, BATCH):
        [decode(payload) for _, payload in msgs[i : i + BATCH]]
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="readings per run")
    ap.add_argument("--quick", action="store_true", help="20,000 readings, three runs per stage")
    ap.add_argument("--runs", type=int, default=3, help="runs per stage (the lowest is reported)")
    ap.add_argument("--role", choices=("main", "run"), default="main", help=argparse.SUPPRESS)
    ap.add_argument("--upto", choices=STAGES, default="threshold", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "run":
        cpu, out = run(args.n, args.upto)
        print(json.dumps({"cpu_s": cpu, "out": out}))
        return
    if args.quick:
        args.n, args.runs = 20_000, 3
    best: dict[str, float] = {}
    bare = min(floor(args.n) for _ in range(args.runs)) / args.n * 1e6
    for _ in range(args.runs):  # stages in turn, so that each sees the same moments of a busy machine
        for stage in STAGES[1:]:
            us = run(args.n, stage)[0] / args.n * 1e6  # a gateway of its own each time
            best[stage] = min(best.get(stage, us), us)
    print(f"the realistic flow's nodes in process, {args.n:,} readings in batches of {BATCH}, no sink")
    print(f"lowest of {args.runs} runs per stage; a stage is its cut minus the one before")
    print("| stage | CPU µs per reading | up to here |")
    print("| --- | ---: | ---: |")
    before = 0.0
    stages: dict[str, float] = {}
    for stage in STAGES[1:]:
        stages[stage] = best[stage] - before
        print(f"| {stage} | {stages[stage]:.3f} | {best[stage]:.3f} |")
        before = best[stage]
    print(f"| msgspec decode to dicts (the floor) | {bare:.3f} | |")
    total = best["threshold"]
    print(
        json.dumps(
            {
                "bench": "ingest_path",
                "ratio": round(bare / total, 3) if total > 0 else None,
                "us_per_reading": round(total, 3),
                "stages_us": {k: round(v, 3) for k, v in stages.items()},
                "floor_us": round(bare, 3),
                "readings": args.n,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
