"""The ``llm`` node in running pipelines: a tiny real GGUF and a real HTTP server as the models."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest

from gateway import node as node_mod
from gateway.config import parse_config
from gateway.deadletter import DeadLetters
from gateway.engine import Pipeline, SourceQueue
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.llm import LlmHub
from gateway.node import NodeContext, NodeOptions, Sink, Source, register
from tests._fake_openai import Behaviour, FakeOpenAI
from tests._tiny_gguf import write_tiny_llama
from tests._util import free_port, wait_for

# --- test-only nodes: a source the test feeds, a sink that keeps what it gets -------------------

FEEDS: dict[str, asyncio.Queue[list[Event]]] = {}


class FeedOptions(NodeOptions):
    type: Literal["t_feed"]


class Feed(Source):
    """Hands over whatever batches the test puts in FEEDS[id]."""

    Options = FeedOptions

    async def run(self, output: SourceQueue) -> None:
        q = FEEDS.setdefault(self.id, asyncio.Queue())
        while True:
            batch = await q.get()
            self.n_in += len(batch)
            await output.put(batch)


class KeepOptions(NodeOptions):
    type: Literal["t_keep"]
    keep: bool = True


class Keep(Sink):
    Options = KeepOptions

    def __init__(self, options: Any, ctx: NodeContext):
        super().__init__(options, ctx)
        self.events: list[Event] = []

        self.count = 0

    async def write(self, batch: list[Event]) -> None:
        self.count += len(batch)
        if self.options.keep:  # type: ignore[attr-defined]
            self.events.extend(batch)

    def final(self) -> list[dict[str, Any]]:
        """Result values (not stream chunks)."""
        return [e.value for e in self.events if e.value.get("llm") != "chunk"]


@pytest.fixture(autouse=True)
def _nodes() -> Iterator[None]:
    for cls in (Feed, Keep):
        register(cls)
    FEEDS.clear()
    yield
    for cls in (Feed, Keep):
        node_mod._REGISTRY.pop(cls.type_name, None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as s:
        yield s


# --- helpers -------------------------------------------------------------------------------------


class Running:
    def __init__(self, pipeline: Pipeline, hub: LlmHub):
        self.p = pipeline
        self.hub = hub

    def node(self, node_id: str) -> Any:
        return self.p.nodes[self.p.index[node_id]]

    def feed(self, *events: Event, source: str = "src") -> None:
        FEEDS.setdefault(source, asyncio.Queue()).put_nowait(list(events))


def _config(tmp_path: Path, llm: str, nodes: str) -> str:
    return f"""gateway: {{id: gw, data_dir: {tmp_path}}}
llm:
  providers:
{llm}
pipelines:
  - name: p
    nodes:
{nodes}
"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Any]:
    """`await running(llm_yaml, nodes_yaml)` -> a started Running; stopped (and checked) at the end."""
    started: list[tuple[Running, asyncio.Task[None]]] = []

    async def start(llm: str, nodes: str) -> Running:
        loaded = parse_config(_config(tmp_path, llm, nodes), env={})
        hub = LlmHub(loaded.config.llm)
        await hub.start()
        dl = DeadLetters(tmp_path / "dl.db")
        links = SimpleNamespace(llm=hub)
        p = Pipeline("p", loaded.nodes["p"], lambda nid: NodeContext("gw", "p", nid, str(tmp_path), links, dl))
        task = asyncio.create_task(p.run())
        r = Running(p, hub)
        started.append((r, task))
        await wait_for(lambda: p.state == "running", timeout=10)
        return r

    yield start
    for r, task in started:
        r.p.stop()
        await asyncio.wait_for(task, 30)
        await r.hub.close()
        assert r.p.state == "stopped"


def alert(key: str, severity: str = "warning", reading: float = 93.0, ts: float = 1.0) -> Event:
    return Event(
        key,
        ts,
        {
            "state": "raised",
            "alert_key": f"p/hot/{key}",
            "severity": severity,
            "reading": reading,
            "rule": f"{key} above 90",
        },
        "hot",
    )


def _local(path: Path) -> str:
    return f"    tiny: {{type: local, model: {path}, chat_format: gemma, n_ctx: 512, threads: 1}}"


def _remote(server: FakeOpenAI, name: str = "cloud", **kw: Any) -> str:
    extra = "".join(f", {k}: {v}" for k, v in kw.items())
    return f"    {name}: {{type: remote, url: {server.url}{extra}}}"


# --- results ----------------------------------------------------------------------------------


async def test_joined_results_from_the_local_model(running: Any, tiny_model: Path) -> None:
    r = await running(
        _local(tiny_model),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: tiny, max_tokens: 8, temperature: 0, coalesce_by: null}
      - {id: out, type: t_keep, input: explain}
""",
    )
    out = r.node("out")
    r.feed(alert("b1"), alert("b2", "critical"), alert("b3"))
    await wait_for(lambda: len(out.events) == 3, timeout=20)
    for v in out.final():
        assert v["llm"] == "ok" and v["provider"] == "tiny"
        assert isinstance(v["text"], str)
        assert v["rule"].endswith("above 90") and v["reading"] == 93.0  # the alert's own fields stay
        assert v["tokens"] >= 1 and v["total_s"] > 0 and v["first_token_s"] is not None
        assert v["queued_s"] >= 0 and v["tokens_per_s"] > 0
    assert sorted(e.key for e in out.events) == ["b1", "b2", "b3"]
    c = r.node("explain").counters()
    assert c["in"] == 3 and c["out"] == 3 and c["llm_ok"] == 3


async def test_stream_output_sends_chunks_then_the_result(running: Any, server: FakeOpenAI) -> None:
    r = await running(
        _remote(server),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, output: stream, system: "be brief",
         prompt: "why is {{ key }} at {{ value.reading }}?"}
      - {id: out, type: t_keep, input: explain}
""",
    )
    out = r.node("out")
    r.feed(alert("boiler"))
    await wait_for(lambda: any(e.value["llm"] == "ok" for e in out.events), timeout=10)
    chunks = [e.value for e in out.events if e.value["llm"] == "chunk"]
    assert [c["text"] for c in chunks] == ["The ", "boiler ", "is ", "hot", "."]
    assert [c["seq"] for c in chunks] == [0, 1, 2, 3, 4]
    assert out.events[-1].value["text"] == "The boiler is hot."
    assert {c["request"] for c in chunks} == {out.events[-1].value["request"]}
    assert server.requests[0]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "why is boiler at 93.0?"},
    ]


async def test_json_schema_output_is_parsed_and_validated(running: Any, tiny_model: Path) -> None:
    r = await running(
        _local(tiny_model),
        """\
      - {id: src, type: t_feed}
      - id: explain
        type: llm
        input: src
        provider: tiny
        max_tokens: 80
        temperature: 0
        json_schema:
          type: object
          properties: {cause: {type: string, maxLength: 10}, urgent: {type: boolean}}
          required: [cause, urgent]
      - {id: out, type: t_keep, input: explain}
""",
    )
    out = r.node("out")
    r.feed(alert("boiler"))
    await wait_for(lambda: len(out.events) == 1, timeout=20)
    v = out.events[0].value
    assert v["llm"] == "ok", v
    assert set(v["json"]) == {"cause", "urgent"} and isinstance(v["json"]["urgent"], bool)


async def test_output_that_is_not_the_asked_json_is_an_error_event(running: Any, server: FakeOpenAI) -> None:
    server.plan = [
        Behaviour(tokens=["not ", "json"]),
        Behaviour(tokens=['{"cause": 1}']),
        Behaviour(tokens=['{"cause": "fouling"}']),
    ]
    r = await running(
        _remote(server),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, coalesce_by: null,
         json_schema: {type: object, properties: {cause: {type: string}}, required: [cause]}}
      - {id: out, type: t_keep, input: explain}
""",
    )
    out = r.node("out")
    for k in ("a", "b", "c"):
        r.feed(alert(k))
        await wait_for(lambda k=k: any(e.key == k for e in out.events), timeout=10)
    a, b, c = (e.value for e in out.events)
    assert a["llm"] == "error" and "not valid JSON" in a["llm_error"] and a["model_text"] == "not json"
    assert a["text"] == "a above 90 (raised)"  # the rule text stands in
    assert b["llm"] == "error" and "$.cause should be string" in b["llm_error"]
    assert c["llm"] == "ok" and c["json"] == {"cause": "fouling"}
    assert r.node("explain").counters()["errors"] == 2


async def test_a_template_error_is_an_error_event_and_a_dead_letter(
    running: Any, server: FakeOpenAI, tmp_path: Path
) -> None:
    r = await running(
        _remote(server),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, prompt: "{{ value.missing_field }}"}
      - {id: out, type: t_keep, input: explain}
""",
    )
    r.feed(alert("a"), Event("b", 1.0, {"missing_field": "here"}, "x"))
    out = r.node("out")
    await wait_for(lambda: len(out.events) == 2, timeout=10)
    a, b = sorted(out.events, key=lambda e: e.key)
    # the alert still goes out, with its rule text; the event is dead-lettered with the reason
    assert a.value["llm"] == "error" and a.value["text"] == "a above 90 (raised)"
    assert "prompt template failed on this event" in a.value["llm_error"]
    assert "missing_field" in a.value["llm_error"]
    assert b.value["llm"] == "ok"
    assert r.node("explain").counters()["errors"] == 1
    assert len(server.requests) == 1 and server.requests[0]["messages"][-1]["content"] == "here"


NESTED_LOOPS = "{% for a in range(3000) %}{% for b in range(3000) %}{% endfor %}{% endfor %}{{ value }}"


async def test_a_template_over_its_render_budget_is_refused_and_counted(
    running: Any, server: FakeOpenAI, tmp_path: Path
) -> None:
    """Nested loops of 9 million iterations held the event loop for seconds on one event."""
    r = await running(
        _remote(server),
        f"""\
      - {{id: src, type: t_feed}}
      - {{id: explain, type: llm, input: src, provider: cloud, prompt: "{NESTED_LOOPS}"}}
      - {{id: big, type: llm, input: src, provider: cloud, prompt: "{{{{ 'x' * 1000000000 }}}}"}}
      - {{id: out, type: t_keep, input: [explain, big]}}
""",
    )
    r.feed(alert("a"))
    out = r.node("out")
    await wait_for(lambda: len(out.events) == 2, timeout=10)
    by_node = {e.source: e.value for e in out.events}
    # the alert still goes out with its rule text; the reason names the budget
    loops, big = by_node["explain"], by_node["big"]
    assert loops["llm"] == "error" and loops["text"] == "a above 90 (raised)"
    assert "more than 10,000 loop iterations and calls in one render" in loops["llm_error"], loops
    assert big["llm"] == "error" and "the * operator would make over 100,000 characters" in big["llm_error"], big
    for nid in ("explain", "big"):
        c = r.node(nid).counters()
        assert c["errors"] == 1 and c["template_over_budget"] == 1, (nid, c)
    assert server.requests == []


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for a in [1] recursive %}{{ loop([a]) }}{% endfor %}", "recursive loops are not allowed"),
        ("{{ key }}" * 2000, "the template is 18,000 characters long; the limit is 16,384"),
        # deeper than Jinja's parser or Python's compiler can go: was a RecursionError, a 500
        ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "the template is nested too deeply"),
        ("{% if 1 %}" * 150 + "{% endif %}" * 150, "the template is nested too deeply"),
    ],
)
def test_templates_the_budget_cannot_bound_are_refused_at_validation(
    tmp_path: Path, template: str, message: str
) -> None:
    nodes = f"""\
      - {{id: src, type: t_feed}}
      - {{id: explain, type: llm, input: src, provider: cloud, prompt: "{template}"}}
      - {{id: out, type: t_keep, input: explain}}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(_config(tmp_path, "    cloud: {type: remote, url: http://127.0.0.1:9}", nodes), "c.yaml", env={})
    assert f"pipelines.0.nodes.1.prompt: value error, template does not compile: {message}" in str(info.value)


# --- shedding -----------------------------------------------------------------------------------


async def test_each_shed_reason_is_counted_and_the_alert_still_goes_out(running: Any, server: FakeOpenAI) -> None:
    server.default = Behaviour("hang")  # the model is busy until the test releases it
    r = await running(
        _remote(server, concurrency=1),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, max_queue: 2, deadline: 1.5s}
      - {id: out, type: t_keep, input: explain}
""",
    )
    out, explain = r.node("out"), r.node("explain")
    r.feed(alert("k0"))
    await wait_for(lambda: len(server.requests) == 1, timeout=10)  # k0 is with the model
    r.feed(
        alert("k1", "info"),
        alert("k1", "info", reading=95.0),
        alert("k2", "info"),
        alert("k3", "info"),
        alert("k4", "critical"),
    )
    # k1 replaced by the newer k1 (coalesced); queue [k1', k2] full: k3 shed (queue_full);
    # critical k4 evicts the oldest low-priority item, k1' (queue_full)
    await wait_for(lambda: len(out.events) == 3, timeout=10)
    shed = {(e.key, e.value["reading"]): e.value["llm_reason"] for e in out.events}
    assert shed == {("k1", 93.0): "coalesced", ("k3", 93.0): "queue_full", ("k1", 95.0): "queue_full"}
    for e in out.events:
        assert e.value["llm"] == "shed" and e.value["text"] == f"{e.key} above 90 (raised)"
        assert e.value["alert_key"] == f"p/hot/{e.key}"
    # k2 and k4 wait past the deadline while k0 still holds the model
    await wait_for(lambda: len(out.events) == 5, timeout=10)
    assert {e.key: e.value["llm_reason"] for e in out.events[3:]} == {"k2": "deadline", "k4": "deadline"}
    server.release.set()
    await wait_for(lambda: len(out.events) == 6, timeout=10)
    assert out.events[-1].key == "k0" and out.events[-1].value["llm"] == "ok"
    c = explain.counters()
    assert (c["shed_coalesced"], c["shed_queue_full"], c["shed_deadline"], c["shed_breaker_open"]) == (1, 2, 2, 0)
    assert c["llm_ok"] == 1 and c["in"] == 6 and c["out"] == 6


async def test_breaker_open_sheds_at_once_and_the_fallback_answers(running: Any, server: FakeOpenAI) -> None:
    down = f"    down: {{type: remote, url: 'http://127.0.0.1:{free_port()}/v1', retries: 0, breaker_failures: 2}}"
    r = await running(
        down,
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: down, coalesce_by: null}
      - {id: out, type: t_keep, input: explain}
""",
    )
    out, explain = r.node("out"), r.node("explain")
    for i in range(2):
        r.feed(alert(f"a{i}"))
        await wait_for(lambda i=i: len(out.events) == i + 1, timeout=10)
    assert [e.value["llm"] for e in out.events] == ["error", "error"]
    assert "cannot reach" in out.events[0].value["llm_error"]
    # now known down: no request, no wait, the alert goes out marked shed
    r.feed(*(alert(f"b{i}") for i in range(5)))
    await wait_for(lambda: len(out.events) == 7, timeout=10)
    assert {e.value["llm_reason"] for e in out.events[2:]} == {"breaker_open"}
    assert explain.counters()["shed_breaker_open"] == 5
    assert r.hub.slot("down").stats.requests == 2


async def test_fallback_chain_uses_the_next_provider(running: Any, server: FakeOpenAI, tiny_model: Path) -> None:
    llm = "\n".join(
        [f"    down: {{type: remote, url: 'http://127.0.0.1:{free_port()}/v1', retries: 0}}", _remote(server, "backup")]
    )
    r = await running(
        llm,
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: [down, backup], coalesce_by: null, concurrency: 1}
      - {id: out, type: t_keep, input: explain}
""",
    )
    out = r.node("out")
    r.feed(*(alert(f"a{i}") for i in range(4)))
    await wait_for(lambda: len(out.events) == 4, timeout=10)
    assert {(e.value["llm"], e.value["provider"]) for e in out.events} == {("ok", "backup")}
    assert r.hub.slot("down").breaker.state == "open"
    assert r.hub.slot("down").stats.requests == 3  # the default breaker opens after 3 failures


async def test_overload_bounded_queue_and_critical_alerts_are_not_shed(running: Any, server: FakeOpenAI) -> None:
    server.default = Behaviour(tokens=["ok"], delay=0.005)
    r = await running(
        _remote(server, concurrency=1),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, max_queue: 16, deadline: null, coalesce_by: null}
      - {id: out, type: t_keep, input: explain}
""",
    )
    out, explain = r.node("out"), r.node("explain")
    n = 0
    for batch in range(10):
        events = [alert(f"s{batch}-{i}", "critical" if i == 0 else "info") for i in range(30)]
        n += len(events)
        r.feed(*events)
    await wait_for(lambda: len(out.events) == n, timeout=30)  # one outcome per input, nothing lost
    by_sev: dict[str, list[str]] = {"critical": [], "info": []}
    for e in out.events:
        by_sev[e.value["severity"]].append(e.value["llm"])
    assert by_sev["critical"] == ["ok"] * 10
    assert by_sev["info"].count("shed") >= 200
    q = explain.queue
    assert q.high_water <= 16 and q.shed["queue_full"] == by_sev["info"].count("shed")
    assert server.max_in_flight == 1


async def test_the_other_branch_flows_while_the_model_is_stuck(running: Any, server: FakeOpenAI) -> None:
    server.default = Behaviour("hang")
    r = await running(
        _remote(server, concurrency=1),
        """\
      - {id: src, type: simulate, sensors: [{key: t1, base: 50}, {key: t2, base: 60}], count: 2500,
         realtime: false, seed: 1}
      - {id: explain, type: llm, input: src, provider: cloud, max_queue: 8, coalesce_by: null}
      - {id: fast, type: map, input: src, value: "value * 2.0"}
      - {id: out, type: t_keep, input: fast}
      - {id: llm_out, type: t_keep, input: explain}
""",
    )
    explain = r.node("explain")
    out, llm_out = r.node("out"), r.node("llm_out")
    await wait_for(lambda: len(out.events) == 5000, timeout=30)
    # every reading reached the fast branch while the model answered nothing
    assert len(server.requests) == 1 and explain.counters()["llm_ok"] == 0
    assert explain.counters()["in"] == 5000
    await wait_for(lambda: len(llm_out.events) == 5000 - 1 - 8, timeout=10)
    assert {e.value["llm_reason"] for e in llm_out.events} == {"queue_full"}
    assert len(explain.queue) == 8 and explain.in_flight == 1
    server.release.set()
    await wait_for(lambda: explain.counters()["llm_ok"] >= 1, timeout=10)


async def test_stopping_sheds_what_is_queued_with_rule_text(tmp_path: Path, server: FakeOpenAI) -> None:
    server.default = Behaviour("hang")
    loaded = parse_config(
        _config(
            tmp_path,
            _remote(server, concurrency=1),
            """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, coalesce_by: null}
      - {id: out, type: t_keep, input: explain}
""",
        ),
        env={},
    )
    hub = LlmHub(loaded.config.llm)
    dl = DeadLetters(tmp_path / "dl.db")
    links = SimpleNamespace(llm=hub)
    p = Pipeline("p", loaded.nodes["p"], lambda nid: NodeContext("gw", "p", nid, str(tmp_path), links, dl))
    task = asyncio.create_task(p.run())
    await wait_for(lambda: p.state == "running", timeout=10)
    FEEDS.setdefault("src", asyncio.Queue()).put_nowait([alert(f"a{i}") for i in range(4)])
    explain = p.nodes[p.index["explain"]]
    await wait_for(lambda: len(server.requests) == 1 and len(explain.queue) == 3, timeout=10)
    p.stop()
    await asyncio.wait_for(task, 10)
    await hub.close()
    out = p.nodes[p.index["out"]]
    assert sorted(e.key for e in out.events) == ["a0", "a1", "a2", "a3"]
    assert {e.value["llm_reason"] for e in out.events} == {"shutdown"}
    assert explain.counters()["shed_shutdown"] == 4


# --- config ------------------------------------------------------------------------------------


def test_config_checks_providers_and_options(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            _config(
                tmp_path,
                _local(tiny_model),
                """\
      - {id: src, type: simulate, sensors: [{key: t1, base: 50}]}
      - {id: explain, type: llm, input: src, provider: [tiny, cloud]}
      - {id: bad, type: llm, input: src, provider: tiny, prompt: "{{ oops", output: lines}
""",
            ),
            "c.yaml",
            env={},
        )
    text = str(info.value)
    assert "c.yaml:9: pipelines.0.nodes.1.provider.1: unknown llm provider 'cloud'; known: tiny" in text
    assert "pipelines.0.nodes.2.prompt: value error, template does not compile" in text
    assert "pipelines.0.nodes.2.output: input should be 'joined' or 'stream'" in text
    with pytest.raises(ConfigError) as info:
        parse_config(
            _config(
                tmp_path,
                f"    m: {{type: local, model: {tmp_path}/none.gguf}}\n    r: {{type: remote, url: ftp://x}}",
                """\
      - {id: src, type: simulate, sensors: [{key: t1, base: 50}]}
""",
            ),
            "c.yaml",
            env={},
        )
    text = str(info.value)
    # (pydantic puts the provider type in the path: providers.<name>.<type>.<field>)
    assert "c.yaml:4: llm.providers.m.local: value error, model file" in text and "does not exist" in text
    assert "c.yaml:5: llm.providers.r.remote.url: string should match pattern" in text
    loaded = parse_config(
        _config(
            tmp_path,
            _local(tiny_model) + "\n    cloud: {type: remote, url: 'https://api.example.com/v1', api_key: '${KEY}'}",
            "      - {id: src, type: simulate, sensors: [{key: t1, base: 50}]}\n",
        ),
        env={"KEY": "sk-1"},
    )
    assert loaded.config.llm.providers["cloud"].api_key == "sk-1"  # type: ignore[union-attr]
    assert json.dumps(loaded.config.llm.model_dump(mode="json"))


async def test_memory_stays_flat_under_sustained_overload(running: Any, server: FakeOpenAI) -> None:
    server.default = Behaviour("hang")  # nothing is ever answered: everything beyond the queue is shed
    r = await running(
        _remote(server, concurrency=1),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, max_queue: 32, coalesce_by: null}
      - {id: out, type: t_keep, input: explain, keep: false}
""",
    )
    out = r.node("out")

    explain = r.node("explain")

    def settled(total: int) -> bool:
        # every event is either shed (and out), queued, or with the model
        return explain.n_in == total and out.count == total - len(explain.queue) - explain.in_flight

    async def burst(start: int) -> None:
        for b in range(20):
            r.feed(*(alert(f"k{start + b * 500 + i}", "info") for i in range(500)))
        await wait_for(lambda: settled(start + 10_000), timeout=30)

    await burst(0)  # warm up: queue full, caches filled
    tracemalloc.start()
    try:
        await burst(10_000)
        gc.collect()
        after_one = tracemalloc.get_traced_memory()[0]  # includes the last batch, still referenced
        await burst(20_000)
        await burst(30_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - after_one
    finally:
        tracemalloc.stop()
    assert len(r.node("explain").queue) == 32
    # 20,000 more events shed: what is kept must not grow with them (a leak would be megabytes)
    assert grown < 64 * 1024, grown
    assert explain.counters()["shed_queue_full"] == 40_000 - 33


async def test_an_unexpected_failure_in_a_request_is_an_error_event(running: Any, server: FakeOpenAI) -> None:
    r = await running(
        _remote(server),
        """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, coalesce_by: null}
      - {id: out, type: t_keep, input: explain}
""",
    )
    explain, out = r.node("explain"), r.node("out")
    real = explain._result

    def broken(*args: Any) -> Event:
        raise KeyError("bug")

    explain._result = broken  # a bug in building the result, after the model answered
    r.feed(alert("a"))
    await wait_for(lambda: len(out.events) == 1, timeout=10)
    explain._result = real
    r.feed(alert("b"))
    await wait_for(lambda: len(out.events) == 2, timeout=10)
    a, b = (e.value for e in out.events)
    assert a["llm"] == "error" and a["text"] == "a above 90 (raised)" and "KeyError" in a["llm_error"]
    assert b["llm"] == "ok"  # the worker lived on
    assert explain.counters()["errors"] == 1


class _GateOptions(NodeOptions):
    type: Literal["t_gate"]


class _Gate(Sink):
    """A sink as slow as the test wants: it writes nothing until ``open`` is set."""

    Options = _GateOptions

    def __init__(self, options: Any, ctx: NodeContext):
        super().__init__(options, ctx)
        self.open = asyncio.Event()
        self.events: list[Event] = []

    async def write(self, batch: list[Event]) -> None:
        await self.open.wait()
        self.events.extend(batch)


async def test_a_slow_sink_bounds_what_a_streaming_node_queues(tmp_path: Path, server: FakeOpenAI) -> None:
    tokens = [f"t{i} " for i in range(2000)]
    server.default = Behaviour(tokens=tokens)
    register(_Gate)
    loaded = parse_config(
        _config(
            tmp_path,
            _remote(server),
            """\
      - {id: src, type: t_feed}
      - {id: explain, type: llm, input: src, provider: cloud, output: stream, max_tokens: 4000}
      - {id: out, type: t_gate, input: explain}
""",
        ),
        env={},
    )
    hub = LlmHub(loaded.config.llm)
    await hub.start()
    dl = DeadLetters(tmp_path / "dl.db")
    links = SimpleNamespace(llm=hub)
    p = Pipeline(
        "p",
        loaded.nodes["p"],
        lambda nid: NodeContext("gw", "p", nid, str(tmp_path), links, dl),
        queue_size=16,
        sink_queue_size=16,
    )
    task = asyncio.create_task(p.run())
    try:
        explain, out = p.nodes[p.index["explain"]], p.nodes[p.index["out"]]
        await wait_for(lambda: p.state == "running", timeout=10)
        FEEDS.setdefault("src", asyncio.Queue()).put_nowait([alert("boiler")])
        # the whole answer has streamed while the sink wrote nothing: the chunks that found no
        # room were shed and counted, and the result waits for room instead
        await wait_for(lambda: explain.counters()["llm_tokens"] == 2000, timeout=20)
        assert p.queue.high_water <= 16, p.queue.stats()
        shed = explain.counters()["shed_chunk"]
        assert shed > 1900
        out.open.set()
        await wait_for(lambda: any(e.value["llm"] == "ok" for e in out.events), timeout=20)
        chunks = [e.value for e in out.events if e.value["llm"] == "chunk"]
        assert len(chunks) + shed == 2000
        assert [c["text"] for c in chunks] == [tokens[c["seq"]] for c in chunks]
        assert out.events[-1].value["text"] == "".join(tokens).strip()
        assert explain.counters()["dropped"] == shed  # every refused chunk, and nothing else
    finally:
        p.stop()
        await asyncio.wait_for(task, 30)
        await hub.close()
        node_mod._REGISTRY.pop(_Gate.type_name, None)
