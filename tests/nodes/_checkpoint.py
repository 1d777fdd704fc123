"""What a gateway's last committed checkpoint holds, read from its ``state.db`` while it runs (the
kill tests of the consumer-group sources wait until the saved windows are ahead of the broker)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path


def saved_watermark(state_db: Path, pipeline: str, node: str) -> float | None:
    """The watermark of window ``node`` of ``pipeline`` in the last checkpoint committed to
    ``state_db``, if any."""
    if not state_db.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)) as db:
        try:
            row = db.execute(
                "SELECT value FROM state WHERE pipeline=? AND node=? AND key='.#'", (pipeline, node)
            ).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return None
    wm = None if row is None else json.loads(row[0])["wm"]
    return wm if isinstance(wm, float) else None  # "-inf" (as text) before the first reading
