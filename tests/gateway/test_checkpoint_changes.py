"""A checkpoint costs what changed: a window with many keys hands over only its changed entries,
the state file then holds exactly what a full snapshot would, a restart restores it, and a costly
checkpoint spaces the next one out. Real SQLite state file, real window node."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gateway import store as store_mod
from gateway.deadletter import DeadLetters
from gateway.events import Event
from gateway.node import NodeContext
from gateway.store import Checkpointer, StateStore
from nodes.windows import Window, WindowOptions

T0 = 1_700_000_000.0


def window(tmp_path: Path) -> Window:
    ctx = NodeContext("gw", "p", "avg", str(tmp_path), None, DeadLetters(None))
    return Window(WindowOptions(id="avg", type="window", kind="tumbling", size=10.0, aggregate="mean"), ctx)


def stored(store: StateStore) -> dict[str, object]:
    return {k: json.loads(v) for k, v in store.load_state("p", "avg").items()}


async def test_only_changed_keys_are_taken_and_the_file_equals_a_full_snapshot(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    await store.start()
    try:
        w = window(tmp_path)
        ckpt = Checkpointer(store, "p", [w])
        keys = [f"s{i:04d}" for i in range(2000)]
        w.process_batch([Event(k, T0 + 1, 1.0, "src") for k in keys])
        ckpt.commit(ckpt.take())  # the first one is full
        await store.flush()

        w.process_batch([Event(k, T0 + 2, 5.0, "src") for k in keys[:7]])
        snaps = ckpt.take()
        changes = snaps["avg"]
        assert isinstance(changes, store_mod._Changes)
        assert sorted(changes.changed) == sorted(["#"] + [f"k:{k}" for k in keys[:7]])
        ckpt.commit(snaps)
        await store.flush()

        # windows close (keys without an open window leave the state), others open
        w.process_batch([Event("late-comer", T0 + 15, 2.0, "src")])
        ckpt.commit(ckpt.take())
        await store.flush()
        full = {"." + k: json.loads(json.dumps(v)) for k, v in w.snapshot().items()}
        assert stored(store) == full
        assert ".k:s0000" not in full and ".k:late-comer" in full
    finally:
        await store.close()

    store = StateStore(tmp_path / "state.db")
    await store.start()
    try:
        again = window(tmp_path)
        ckpt = Checkpointer(store, "p", [again])
        await ckpt.restore()
        assert again.snapshot() == {k[1:]: v for k, v in full.items()}
        # and after a restore the next checkpoint is again only what changed
        again.process_batch([Event("late-comer", T0 + 16, 4.0, "src")])
        changes = ckpt.take()["avg"]
        assert isinstance(changes, store_mod._Changes)
        assert sorted(changes.changed) == ["#", "k:late-comer"]
    finally:
        await store.close()


async def test_a_costly_checkpoint_spaces_the_next_one_out(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    await store.start()
    try:

        class Slow:
            id = "slow"

            def snapshot(self) -> int:
                time.sleep(0.05)  # a checkpoint that takes 50 ms of the loop
                return 1

        ckpt = Checkpointer(store, "p", [Slow()], interval=0.01)
        now = time.monotonic()
        assert ckpt.due(now)
        ckpt.commit(ckpt.take())
        # 50 ms of work at a 10 % budget: the next one not before ~450 ms from now
        assert not ckpt.due(time.monotonic() + 0.3)
        assert ckpt.due(time.monotonic() + 3600)  # spaced out, not stopped
        await store.flush()
    finally:
        await store.close()
