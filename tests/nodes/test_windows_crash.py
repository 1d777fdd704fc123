"""SIGKILL a real gateway subprocess a few times mid-stream: state.db stays sound, window results match one clean run.

The full version (50 rounds) is `scripts/crash_windows.py`; this runs three rounds of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crash_windows.py"


def test_sigkill_rounds_lose_nothing_and_invent_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--rounds",
            "3",
            "--events",
            "2500",
            "--rate",
            "1000",
            "--min-delay",
            "1.0",
            "--max-delay",
            "2.2",
            "--seed",
            "7",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"crash": "windows", "rounds": 3, "kills": summary["kills"], "ok": True}, report
    assert summary["kills"] >= 1, report  # at least one kill landed before the input was done
    assert report.count("quick_check: ok") == 3
