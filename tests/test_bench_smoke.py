"""``vbusemu bench --quick`` produces well-formed results (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import timing

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "workload",
    "params",
    "metric",
    "value",
    "unit",
    "path",
    "baseline",
    "baseline_value",
    "ratio",
    "min",
    "max",
    "reps",
    "spread",
    "noisy",
    "machine",
}
NO_RING = ("baseline", "control-plane")  # workloads that run no ring code: no path


@pytest.mark.timeout(timing.scaled(120))  # (a first-run kernel compile is timed 3 times)
def test_bench_quick_writes_results_table_and_targets(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hostemu.cli", "bench", "--quick", "--out", str(tmp_path)],
        env={**os.environ, "VBUSEMU_BENCH_SHRINK": "0.2"},  # the format, not the figures
        capture_output=True,
        text=True,
        timeout=timing.scaled(200),
        cwd=ROOT,
    )
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
        assert {
            "cores",
            "cpu_model",
            "kernel",
            "python",
            "numpy",
            "load_before",
            "load_after",
        } <= set(row["machine"])
        # every figure says which data path produced it
        if row["workload"] in NO_RING:
            assert row["path"] is None, row
        else:
            assert row["path"] in ("kernels", "reference"), row
        assert row["reps"] >= 3, row  # quick mode repeats every figure too
        assert isinstance(row["noisy"], bool), row
        assert row["noisy"] == (row["spread"] is not None and row["spread"] > 0.25), row
    workloads = {r["workload"] for r in rows}
    assert {
        "small-messages",
        "round-trip",
        "bulk",
        "control-plane",
        "scale",
        "baseline",
    } <= workloads
    kinds = {r["params"].get("kind") for r in rows if r["workload"] == "baseline"}
    assert {"pipe", "queue", "socketpair", "eventfd-pingpong", "numpy-copy"} <= kinds
    small = [r for r in rows if r["workload"] == "small-messages"]
    assert {r["metric"] for r in small} == {"msgs/s", "doorbells/msg", "interrupts/msg"}
    # every small-message figure sits next to baselines given the same window
    windows = {
        (r["params"]["kind"], r["params"]["batch"]): r["params"]["window"]
        for r in rows
        if r["workload"] == "baseline" and "batch" in r["params"]
    }
    assert small and all(
        windows[(kind, r["params"]["batch"])] == r["params"]["window"]
        for r in small
        for kind in ("pipe", "queue", "socketpair")
    )
    # the reference path next to the kernels: 64 B at batch 1 and 256
    ref = {
        r["params"]["batch"] for r in small if r["path"] == "reference" and r["metric"] == "msgs/s"
    }
    assert ref == {1, 256}
    metrics = {(r["workload"], r["metric"], r["path"]) for r in rows}
    assert {
        ("start-up", "wall", "kernels"),
        ("start-up", "wall", "reference"),
        ("memory", "pss", "kernels"),
        ("memory", "pss", "reference"),
        ("memory", "rss/process", "kernels"),
    } <= metrics
    kinds = {r["params"].get("process") for r in rows if r["workload"] == "memory"}
    assert {
        "broker",
        "vmm",
        "launcher",
        "guest",
        "venet device",
        "blk device",
        "console device",
        "total",
        "per VM",
    } <= kinds
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "quick" and summary["reps"] >= 3
    assert len(summary["load_before"]) == 3 and len(summary["load_after"]) == 3
    assert all(f["path"] in ("kernels", "reference", None) for f in summary["figures"])
    assert summary["noisy"] == [f for f in summary["figures"] if f["noisy"]]
    assert len(summary["targets"]) == 8
    assert all(isinstance(t["met"], bool) for t in summary["targets"])
    # a missed target says plainly where its time goes; its label says met or missed
    assert all((t["why_missed"] is None) == t["met"] for t in summary["targets"])
    assert all(
        t["label"].startswith(t["target"] + ": ")
        and t["label"].split(" — ")[1].split()[0] == ("met" if t["met"] else "missed")
        for t in summary["targets"]
    )
    table = (tmp_path / "results.md").read_text()
    assert "| workload | case | path |" in table and "## Targets" in table
    # one table on the console, the load average in its header (and the warning if busy)
    assert "load average" in out.stdout and "| path |" not in out.stdout
    assert ("WARNING: 1-minute load" in out.stdout) == (summary["load_before"][0] > 0.5)
    assert not any(line.startswith("  small-messages") for line in out.stdout.splitlines())
    assert all(t["label"] in out.stdout for t in summary["targets"])
    try:
        import matplotlib  # noqa: F401  (run.sh installs it; plots are optional otherwise)
    except ImportError:
        return
    for png in (
        "throughput_vs_batch.png",
        "throughput_vs_payload.png",
        "latency.png",
        "latency_cdf.png",
    ):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
