"""``vbusemu run`` of every example topology, end to end, as a user runs it."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests import timing

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

pytestmark = pytest.mark.timeout(240)


def vbusemu_run(topology: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    limit = timing.scaled(timeout)
    return subprocess.run(
        [sys.executable, "-m", "hostemu.cli", "run", str(topology), "--timeout", str(limit)],
        capture_output=True,
        text=True,
        timeout=limit + timing.scaled(60),
        cwd=ROOT,
    )


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


DISK_TOPOLOGY = """
[[vm]]
name = "a"
memory_mib = 4
workload = { name = "main" }
[[vm.device]]
name = "disk0"
model = "blk"
params = { image = "disk.img", capacity = 2048 }
[[vm.device]]
name = "console0"
model = "console"
"""


def test_second_run_of_same_topology_is_refused_while_image_in_use(tmp_path: Path) -> None:
    """A run locks its disk images before it starts anything and keeps them until it has
    stopped everything; a second run of the same topology meanwhile exits 2 at once,
    naming the image, and starts nothing. The first run is frozen (SIGSTOP) right after
    it has started, so the second one certainly overlaps it."""
    topology = tmp_path / "disk.toml"
    topology.write_text(DISK_TOPOLOGY)
    image = tmp_path / "disk.img"
    first = subprocess.Popen(
        [sys.executable, "-m", "hostemu.cli", "run", str(topology), "--timeout", "60"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert first.stdout is not None
        for line in first.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = False
    try:
        seen: list[str] = []
        while not any(line.startswith("broker pid") for line in seen):
            line = lines.get(timeout=60)
            assert line is not None, "".join(seen) + first.stderr.read()  # type: ignore[union-attr]
            seen.append(line)
        os.kill(first.pid, signal.SIGSTOP)  # the launcher, which holds the locks
        stopped = True
        second = vbusemu_run(topology, timeout=30)
        os.kill(first.pid, signal.SIGCONT)
        stopped = False
        assert second.returncode == 2, second.stdout + second.stderr
        assert str(image) in second.stderr
        assert "in use by another vbusemu run" in second.stderr
        assert "broker pid" not in second.stdout
        assert "Traceback" not in second.stderr
        assert first.wait(120) == 0, "".join(seen) + first.stderr.read()  # type: ignore[union-attr]
    finally:
        if stopped:
            os.kill(first.pid, signal.SIGCONT)
        if first.poll() is None:
            first.kill()
            first.wait()
        reader.join(10)
        for stream in (first.stdout, first.stderr):
            if stream is not None:
                stream.close()
    # The first run is over: its locks went with it, the same topology runs again.
    third = vbusemu_run(topology)
    assert third.returncode == 0, third.stdout + third.stderr
