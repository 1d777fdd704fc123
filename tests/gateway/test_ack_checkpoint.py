"""A source's acknowledgement waits for the checkpoint that holds what its batch did to node state.

Otherwise a QoS 1 message could be acknowledged to the broker, the gateway killed before the next
checkpoint, and the restored windows would silently miss that reading.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway import node as node_mod
from gateway.engine import Pipeline
from gateway.node import NodeContext, register
from gateway.store import StateStore
from tests._util import wait_for
from tests.gateway.test_engine import AckSource, build, node, test_nodes  # noqa: F401  # autouse: registers t_collect


async def test_acks_wait_for_the_checkpoint_that_covers_them(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    await store.start()
    register(AckSource)
    try:
        built, dl = build(
            tmp_path,
            """\
      - {id: src, type: t_ack, batches: [[91.0], [92.0], [93.0]]}
      - {id: hot, type: threshold, input: src, above: 90}
      - {id: out, type: t_collect, input: hot}
""",
        )
        # the same nodes, with the store this time
        p = Pipeline(
            "p",
            [n.options for n in built.nodes],
            lambda nid: NodeContext("gw", "p", nid, str(tmp_path), None, dl),
            store=store,
        )
    finally:
        node_mod._REGISTRY.pop("t_ack", None)
    src = node(p, "src")
    seen_at_ack: list[dict[str, bytes]] = []

    class Recording(list):  # type: ignore[type-arg]
        def append(self, i: object) -> None:  # what the database holds at each acknowledgement
            seen_at_ack.append(store.load_state("p", "hot"))
            super().append(i)

    src.acked = Recording()
    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: len(node(p, "out").events) == 1)  # raised once; the others held it
        await wait_for(lambda: src.acked == [0, 1, 2], timeout=10)
        # every acknowledgement came after the threshold's state (key k active) was committed
        assert all(".k" in rows for rows in seen_at_ack), seen_at_ack
        assert store.commits >= 1
    finally:
        p.stop()
        await asyncio.wait_for(task, 10)
        await store.close()


async def test_without_state_acks_do_not_wait(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", commit_interval=3600)
    await store.start()
    register(AckSource)
    try:
        built, dl = build(
            tmp_path,
            """\
      - {id: src, type: t_ack, batches: [[1.0], [2.0]]}
      - {id: keep, type: filter, input: src, where: "value > 0.0"}
      - {id: out, type: t_collect, input: keep}
""",
        )
        p = Pipeline(
            "p",
            [n.options for n in built.nodes],
            lambda nid: NodeContext("gw", "p", nid, str(tmp_path), None, dl),
            store=store,
        )
    finally:
        node_mod._REGISTRY.pop("t_ack", None)
    task = asyncio.create_task(p.run())
    try:
        await wait_for(lambda: node(p, "src").acked == [0, 1], timeout=5)
        assert store.commits == 0  # acknowledged with no checkpoint in between: nothing to wait for
    finally:
        p.stop()
        await asyncio.wait_for(task, 10)
        await store.close()
