"""``vbusemu run`` of every example topology, end to end, as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import timing

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

pytestmark = pytest.mark.timeout(240)


def vbusemu_run(topology: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    limit = timing.scaled(timeout)
    return subprocess.run([sys.executable, "-m", "hostemu.cli", "run", str(topology),
                           "--timeout", str(limit)],
                          capture_output=True, text=True, timeout=limit + timing.scaled(60),
                          cwd=ROOT)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_topology_runs_and_cleans_up(example: Path, tmp_path: Path) -> None:
    copy = tmp_path / example.name  # disk images are created next to the topology file
    shutil.copy(example, copy)
    out = vbusemu_run(copy)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK:" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_default_topology_shows_boot_lines_and_summary(tmp_path: Path) -> None:
    copy = tmp_path / "two-vms.toml"
    shutil.copy(ROOT / "examples" / "two-vms.toml", copy)
    out = vbusemu_run(copy)
    assert out.returncode == 0, out.stdout + out.stderr
    for vm in ("a", "b"):
        assert f"[{vm}] vbusemu guest {vm} booting" in out.stdout
        assert f"[{vm}] disk: ok" in out.stdout
    assert "frames/s" in out.stdout and "doorbells rung/supp" in out.stdout
    assert (tmp_path / "disk-a.img").exists()


def test_malformed_topology_names_the_field_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[vm]]\nname = "a"\nmemory_mib = "lots"\n')
    out = vbusemu_run(bad)
    assert out.returncode == 2
    assert "vm[0].memory_mib" in out.stderr
    assert "broker pid" not in out.stdout
