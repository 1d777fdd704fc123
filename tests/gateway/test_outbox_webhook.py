"""The webhook sink through the outbox, against a real HTTP server: retries on 5xx and when the
server is down, in order, dead letters for a 4xx answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from tests._util import free_port, wait_for
from tests.gateway._harness import node, running_gateway


class Hook:
    """A real HTTP endpoint: records what it accepted; can answer 503 a few times or 400 for a value."""

    def __init__(self) -> None:
        self.accepted: list[dict[str, Any]] = []
        self.requests = 0
        self.fail_first = 0
        self.reject_value: float | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.json()
        if self.requests <= self.fail_first:
            return web.Response(status=503, text="busy")
        if body["value"] == self.reject_value:
            return web.Response(status=400, text="value not allowed")
        assert request.headers["X-Token"] == "s3cret"
        self.accepted.append(body)
        return web.json_response({"ok": True})

    async def start(self, port: int = 0) -> Hook:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def seqs(self) -> list[int]:
        return [b["seq"] for b in self.accepted]


def config(tmp_path: Path, port: int, count: int = 20, base: float = 0.0) -> str:
    return f"""\
gateway: {{id: gw1, data_dir: "{tmp_path}/data"}}
pipelines:
  - name: p
    nodes:
      - {{id: sim, type: simulate, count: {count}, realtime: false,
          sensors: [{{key: s1, base: {base}, amplitude: 0, noise: 0}}]}}
      - {{id: hook, type: webhook, input: sim, url: "http://127.0.0.1:{port}/hook",
          headers: {{X-Token: "${{HOOK_TOKEN}}"}}, reconnect_max: 200ms, timeout: 2s}}
console: {{enabled: false}}
"""


def without_the_webhook(text: str) -> str:
    """``text`` with pipeline p (the webhook) replaced by one that has none."""
    keep = """\
  - name: keep
    nodes:
      - {id: sim, type: simulate, interval: 50ms, sensors: [{key: t}]}
      - {id: out, type: log, input: sim, level: debug}
"""
    return text[: text.index("  - name: p\n")] + keep + text[text.index("console:") :]


def check_in_order(hook: Hook, n: int) -> None:
    first: dict[int, dict[str, Any]] = {}
    order = []
    for b in hook.accepted:
        if b["seq"] in first:
            assert b["replayed"], f"seq {b['seq']} twice without replayed: true"
            continue
        first[b["seq"]] = b
        order.append(b["seq"])
    assert order == sorted(order)
    assert set(first) == set(range(1, n + 1))
    assert all(b["gateway_id"] == "gw1" and b["pipeline"] == "p" and b["key"] == "s1" for b in first.values())


async def test_webhook_retries_5xx_in_order(tmp_path: Path) -> None:
    hook = await Hook().start()
    hook.fail_first = 3
    try:
        async with running_gateway(config(tmp_path, hook.port), env={"HOOK_TOKEN": "s3cret"}) as gw:
            await wait_for(lambda: len(set(hook.seqs())) == 20 and gw.outbox.count == 0, timeout=20)
            assert node(gw, "p", "hook").health()["delivered"] >= 20
        check_in_order(hook, 20)
        assert hook.requests >= 23
        assert any(b["replayed"] for b in hook.accepted[:1])  # the first one went out again after the 503s
    finally:
        await hook.stop()


async def test_webhook_server_down_then_up(tmp_path: Path) -> None:
    port = free_port()
    async with running_gateway(config(tmp_path, port), env={"HOOK_TOKEN": "s3cret"}) as gw:
        sink = node(gw, "p", "hook")
        await wait_for(lambda: sink.health()["state"] in ("down", "retrying") and sink.health()["error"])
        assert "Cannot connect" in sink.health()["error"], sink.health()
        await wait_for(lambda: any(p.startswith("webhook:p/hook: ") for p in gw.health()["problems"]))
        await wait_for(lambda: gw.outbox.count == 20)
        hook = await Hook().start(port)
        try:
            await wait_for(lambda: gw.outbox.count == 0, timeout=20)
        finally:
            await hook.stop()
    check_in_order(hook, 20)


async def test_webhook_4xx_is_dead_lettered_not_retried(tmp_path: Path) -> None:
    hook = await Hook().start()
    text = config(tmp_path, hook.port, count=5, base=7.0)
    hook.reject_value = 7.0  # every reading: all five answered 400
    try:
        async with running_gateway(text, env={"HOOK_TOKEN": "s3cret"}) as gw:
            await wait_for(lambda: gw.outbox.count == 0 and gw.outbox.refused == 5, timeout=20)
            assert hook.requests == 5 and hook.accepted == []
            reasons = [d["reason"] for d in gw.dead_letters.recent]
            assert len(reasons) == 5 and all("HTTP 400 value not allowed" in r for r in reasons)
            assert json.loads(gw.dead_letters.recent[0]["payload"])["value"] == 7.0
    finally:
        await hook.stop()


async def test_reloaded_pipeline_keeps_its_webhook_with_the_new_url(tmp_path: Path) -> None:
    from gateway.config import parse_config

    one, two = await Hook().start(), await Hook().start()
    env = {"HOOK_TOKEN": "s3cret"}
    try:
        async with running_gateway(config(tmp_path, one.port, count=5), env=env) as gw:
            await wait_for(lambda: len(one.accepted) == 5 and gw.outbox.count == 0)
            summary = await gw.reload(parse_config(config(tmp_path, two.port, count=6), "t.yaml", env))
            assert summary["changed"] == ["p"]
            await wait_for(lambda: len(two.accepted) >= 1 and gw.outbox.count == 0, timeout=15)
            assert node(gw, "p", "hook").health()["url"].endswith(f":{two.port}/hook")
            assert min(b["seq"] for b in two.accepted) > 5
    finally:
        await one.stop()
        await two.stop()


async def test_a_webhook_whose_sink_is_removed_is_closed_once_nothing_waits_for_it(tmp_path: Path) -> None:
    from gateway.config import parse_config

    hook = await Hook().start()
    env = {"HOOK_TOKEN": "s3cret"}
    with_hook = config(tmp_path, hook.port, count=5)
    without = without_the_webhook(with_hook)
    try:
        async with running_gateway(with_hook, env=env) as gw:
            await wait_for(lambda: len(hook.accepted) == 5 and gw.outbox.count == 0)
            name = "webhook:p/hook"
            assert name in gw.outbox._extra
            tasks = list(gw.outbox._link_tasks[name])
            summary = await gw.reload(parse_config(without, "t.yaml", env))
            assert summary["removed"] == ["p"]
            assert name not in gw.outbox._extra and name not in gw.outbox._link_tasks
            await wait_for(lambda: all(t.done() for t in tasks))  # its sender and link tasks ended
            # and a pipeline that brings it back gets a working link again
            await gw.reload(parse_config(with_hook.replace("count: 5", "count: 3"), "t.yaml", env))
            await wait_for(lambda: len(hook.accepted) == 8 and gw.outbox.count == 0, timeout=15)
    finally:
        await hook.stop()


async def test_messages_owed_to_a_webhook_the_config_dropped_are_reported(
    tmp_path: Path, monkeypatch: Any, caplog: Any
) -> None:
    from gateway.outbox import Outbox

    monkeypatch.setattr(Outbox, "UNCLAIMED_AFTER", 0.5)
    checks: list[int] = []  # one entry per finished check for unclaimed messages
    real_check = Outbox._warn_unclaimed

    async def check(self: Outbox) -> None:
        await real_check(self)
        checks.append(self.count)

    monkeypatch.setattr(Outbox, "_warn_unclaimed", check)
    env = {"HOOK_TOKEN": "s3cret"}
    port = free_port()  # nothing listens: the five messages stay owed
    with_hook = config(tmp_path, port, count=5)
    without = without_the_webhook(with_hook)
    async with running_gateway(with_hook, env=env) as gw:
        await wait_for(lambda: gw.outbox.count == 5)
    caplog.set_level("WARNING", logger="gateway.outbox")
    async with running_gateway(without, env=env) as gw:
        await wait_for(lambda: "no sink in the config has" in caplog.text, timeout=10)
    assert "messages for webhook:p/hook (ordering keys waiting: 1)" in caplog.text, caplog.text
    caplog.clear()
    hook = await Hook().start(port)
    try:
        async with running_gateway(with_hook.replace("count: 5", "count: 1"), env=env) as gw:
            await wait_for(lambda: len(set(hook.seqs())) == 6 and gw.outbox.count == 0, timeout=20)
            # this start owed messages too, so it checked again: the webhook is back, nothing to report
            await wait_for(lambda: len(checks) == 2, timeout=10)
        assert "no sink in the config has" not in caplog.text, caplog.text
    finally:
        await hook.stop()
