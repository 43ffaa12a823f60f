"""The benchmark runner works: ``python -m bench --quick`` prints a table with every row.

Not a timed test: no figure is asserted, only that each row is measured and printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import ROW_NAMES

_REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=_REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    names = [line.split(" | ")[0].removeprefix("| ") for line in table[1:]]
    for row in ROW_NAMES:
        assert any(name.startswith(row) for name in names), (row, done.stdout)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert len(saved["rows"]) == len(names)
    assert all(r["verdict"] in ("met", "MISSED", "—") for r in saved["rows"])
