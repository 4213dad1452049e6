"""The benchmark harness works end to end: ``scripts/bench capacity`` with tiny counts. Behaviour, not timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qmesh.testing import ROOT


def test_capacity_benchmark_routes_every_chunk_and_records_a_section(tmp_path: Path) -> None:
    record, figures = tmp_path / "BENCHMARKS.md", tmp_path / "figures.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "capacity", "--workers", "1", "--slots", "2"]
    command += ["--requests", "6", "--chunks", "20", "--rounds", "1", "--record", str(record), "--json", str(figures)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(figures.read_text())["capacity"]
    assert data["requests_ok"] == 6
    assert data["chunks"] == 6 * 20
    assert data["lost_chunks"] == 0 and data["failed_requests"] == 0
    assert data["proxy_messages"] == data["inbound"]  # the baseline forwarded as many messages as the broker got
    assert data["warnings"] == 0
    section = record.read_text()
    assert "### capacity: " in section
    assert "- command: `scripts/bench capacity --workers 1" in section
    assert "| CPU us per routed message" in section
