"""Offline repairs of ``state.db`` for ``sluice state …``, run while the gateway is stopped.

``reset_watermark``: a reading from a device with a wrong clock (stamped years ahead) moved a
window node's watermark so far that every later reading is late, and the watermark is saved,
so a restart does not help. The reset forgets the node's watermark and the newest time per
source (the next reading sets them again) and drops the windows that start beyond a cut-off
(by default 5 minutes from now), which only such readings could have opened. Windows before
the cut-off keep their partial aggregates.

The gateway holds a shared lock on ``<data_dir>/lock`` while it runs; these tools take it
exclusively, so they refuse to change the file under a running gateway (which would write its
own watermark back at the next checkpoint).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ._migrate import known_schemas, refuse_newer
from .errors import SluiceError

__all__ = ["data_dir_lock", "reset_watermark"]


@contextlib.contextmanager
def data_dir_lock(data_dir: Path, *, exclusive: bool) -> Iterator[IO[str]]:
    """Hold ``<data_dir>/lock``: shared for a running gateway, exclusive for an offline tool."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # read-only: flock needs no write access, so a lock file that root created (a repair run as
    # root) does not keep the service user's gateway from starting
    fd = os.open(data_dir / "lock", os.O_RDONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd) as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SluiceError(
                f"a gateway is running on {data_dir} (it holds {data_dir / 'lock'}); stop it first"
                if exclusive
                else f"{data_dir} is being changed by a `sluice state` command; start again when it is done"
            ) from None
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _drop_future(entry: dict[str, Any], cutoff: float) -> tuple[dict[str, Any] | None, int]:
    """One key's saved windows without those starting after ``cutoff``: (what is left or None, dropped)."""
    if "w" in entry:  # tumbling, hopping: [[start, acc], ...]
        keep = [w for w in entry["w"] if float(w[0]) <= cutoff]
        return ({"w": keep} if keep else None), len(entry["w"]) - len(keep)
    if "s" in entry:  # session: [[start, last, acc], ...]
        keep = [s for s in entry["s"] if float(s[0]) <= cutoff]
        return ({"s": keep} if keep else None), len(entry["s"]) - len(keep)
    if "p" in entry:  # sliding: buffered readings [ts, seq, value] and pending window ends
        b = [e for e in entry["b"] if float(e[0]) <= cutoff]
        p = [t for t in entry["p"] if float(t) <= cutoff]
        return ({"b": b, "p": p} if b or p else None), len(entry["p"]) - len(p)
    return entry, 0  # count windows: arrival order, no event time


def reset_watermark(db_path: Path, pipeline: str, node: str, cutoff: float) -> dict[str, Any]:
    """Forget a window node's watermark and drop its windows starting after ``cutoff``, in one transaction."""
    if not db_path.exists():
        raise SluiceError(f"{db_path}: no state store here (has the gateway run with this data_dir?)")
    refuse_newer(db_path, known_schemas()["state.db"])  # rows of a newer shape are not ours to edit
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        q = "SELECT value FROM state WHERE pipeline=? AND node=? AND key='.#'"
        row = db.execute(q, (pipeline, node)).fetchone()
        if row is None:
            raise SluiceError(f"no saved window state for node {node!r} of pipeline {pipeline!r} in {db_path}")
        meta = json.loads(row[0])
        old = float(meta.get("wm", "-inf"))
        sources = dict(meta.get("src") or {})
        meta["wm"] = "-inf"
        meta["src"] = {}
        db.execute(
            "UPDATE state SET value=? WHERE pipeline=? AND node=? AND key='.#'",
            (json.dumps(meta, separators=(",", ":")).encode(), pipeline, node),
        )
        dropped = 0
        rows = db.execute(
            "SELECT key, value FROM state WHERE pipeline=? AND node=? AND key LIKE '.k:%'", (pipeline, node)
        ).fetchall()
        for key, value in rows:
            entry, n = _drop_future(json.loads(value), cutoff)
            if not n:
                continue
            dropped += n
            if entry is None:
                db.execute("DELETE FROM state WHERE pipeline=? AND node=? AND key=?", (pipeline, node, key))
            else:
                db.execute(
                    "UPDATE state SET value=? WHERE pipeline=? AND node=? AND key=?",
                    (json.dumps(entry, separators=(",", ":")).encode(), pipeline, node, key),
                )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()
    return {
        "watermark": None if math.isinf(old) else old,
        "sources": sources,
        "windows_dropped": dropped,
    }
