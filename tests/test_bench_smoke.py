"""``vbusemu bench --quick`` produces well-formed results (no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests import timing

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"workload", "params", "metric", "value", "unit", "baseline", "baseline_value", "ratio",
        "min", "max", "reps", "machine"}


@pytest.mark.timeout(240)
def test_bench_quick_writes_results_table_and_targets(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "hostemu.cli", "bench", "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True,
                         timeout=timing.scaled(200), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == KEYS, row
        # a count per message may be 0 (every notification suppressed); figures are not
        assert math.isfinite(row["value"]) and row["value"] >= 0, row
        assert row["value"] > 0 or row["unit"] == "per msg", row
        if row["baseline"] is not None:
            assert row["baseline_value"] > 0 and row["ratio"] > 0, row
        assert {"cores", "cpu_model", "kernel", "python", "numpy"} <= set(row["machine"])
    workloads = {r["workload"] for r in rows}
    assert {"small-messages", "round-trip", "bulk", "control-plane", "scale",
            "baseline"} <= workloads
    kinds = {r["params"].get("kind") for r in rows if r["workload"] == "baseline"}
    assert {"pipe", "queue", "socketpair", "eventfd-pingpong", "numpy-copy"} <= kinds
    small = [r for r in rows if r["workload"] == "small-messages"]
    assert {r["metric"] for r in small} == {"msgs/s", "doorbells/msg", "interrupts/msg"}
    # every small-message figure sits next to baselines given the same window
    windows = {(r["params"]["kind"], r["params"]["batch"]): r["params"]["window"]
               for r in rows if r["workload"] == "baseline" and "batch" in r["params"]}
    assert small and all(windows[(kind, r["params"]["batch"])] == r["params"]["window"]
                         for r in small for kind in ("pipe", "queue", "socketpair"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["targets"]) == 7
    assert all(isinstance(t["met"], bool) for t in summary["targets"])
    # a missed target says plainly where its time goes
    assert all((t["why_missed"] is None) == t["met"] for t in summary["targets"])
    table = (tmp_path / "results.md").read_text()
    assert "| workload |" in table and "## Targets" in table
    assert "ratio" in out.stdout
    try:
        import matplotlib  # noqa: F401  (run.sh installs it; plots are optional otherwise)
    except ImportError:
        return
    for png in ("throughput_vs_batch.png", "throughput_vs_payload.png", "latency.png",
                "latency_cdf.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
