"""The code base stays ruff- and mypy-clean (strict linters)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import timing

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def _tool(name: str) -> list[str]:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed (it comes with the 'dev' extra run.sh installs)")
    return [exe]


def test_ruff_clean() -> None:
    out = subprocess.run(
        [*_tool("ruff"), "check", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timing.scaled(240),
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_formatted() -> None:
    out = subprocess.run(
        [*_tool("ruff"), "format", "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timing.scaled(240),
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_clean() -> None:
    out = subprocess.run(
        [*_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=timing.scaled(280)
    )
    assert out.returncode == 0, out.stdout + out.stderr


# A measured duration: a clock read, or a name that holds one (elapsed, took, worst ping,
# a round-trip time, a gap, ..._s / _ms / _us / _ns).
DURATION = re.compile(
    r"elapsed|took|worst|duration|latency|monotonic|perf_counter|"
    r"time\.time|process_time|\bt0\b|_at\b|rtt|gap|"
    r"_(?:s|ms|us|ns)(?:\b|['\"])",
    re.IGNORECASE,
)
SCALED = re.compile(r"\btiming\.|TIME_SCALE")


def unscaled_duration_bounds(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every assert that bounds a measured duration from above by a
    number not scaled with :mod:`tests.timing` on the spot (``elapsed < 1.0``,
    ``1.0 > took``). Lower bounds (``elapsed >= 0.04``) hold on any machine."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assert):
            continue
        for cmp in ast.walk(node.test):
            if not isinstance(cmp, ast.Compare):
                continue
            sides = [cmp.left, *cmp.comparators]
            for left, op, right in zip(sides[:-1], cmp.ops, sides[1:], strict=True):
                if isinstance(op, ast.Lt | ast.LtE):
                    measured, bound = left, right
                elif isinstance(op, ast.Gt | ast.GtE):
                    measured, bound = right, left
                else:
                    continue
                m_text = ast.get_source_segment(source, measured) or ""
                b_text = ast.get_source_segment(source, bound) or ""
                if DURATION.search(m_text) and not SCALED.search(b_text):
                    found.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return found


def test_unscaled_duration_bound_is_found() -> None:
    """The check below can fail: it finds the forms a loaded machine breaks."""
    # Each expression becomes the test of an assert (kept apart, so that a plain grep
    # for such asserts does not find these samples).
    bad = [
        "time.monotonic() - t0 < 1.0",
        "elapsed <= 2, elapsed",
        "1.0 > took",
        "ok and r['max_gap_s'] < 1.0",
        "q['rtt_p99_us'] < P99_BOUND_US",
        "(time.perf_counter()\n        - start) < 1",
    ]
    source = "".join(f"assert {expr}\n" for expr in bad)
    assert [line for line, _ in unscaled_duration_bounds(source)] == [1, 2, 3, 4, 5, 6]
    fine = [
        "time.monotonic() - t0 >= 0.04",
        "r['max_gap_s'] < timing.scaled(1.0), r",
        "n >= 500 * seconds / timing.TIME_SCALE",
        "not timing.expired(deadline)",
        "growth < 4 << 20",
    ]
    fine_source = "".join(f"assert {expr}\n" for expr in fine)
    assert unscaled_duration_bounds(fine_source) == []


def test_no_test_asserts_an_unscaled_duration() -> None:
    """No test may assert a wall-clock bound a loaded machine can miss: tests wait on
    events, and every bound they do need is scaled by VBUSEMU_TEST_TIME_SCALE
    (:mod:`tests.timing`)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {text.splitlines()[0]}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line, text in unscaled_duration_bounds(path.read_text())
    ]
    assert not offenders, (
        "unscaled wall-clock bounds (wait on an event, or bound the "
        "wait with tests.timing):\n  " + "\n  ".join(offenders)
    )
