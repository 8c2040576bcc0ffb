"""The numpy reference path stays a working data path of its own: the ring and device unit
tests and the data-plane integration tests pass with ``VBUSEMU_JIT=0`` (the rest of the
suite runs on the compiled kernels). And the processes that never run the data path never
load numba."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import timing

ROOT = Path(__file__).resolve().parent.parent

REFERENCE_SUBSET = [
    "tests/unit/test_ring.py",
    "tests/unit/test_ring_scalar.py",
    "tests/unit/test_echo_frames.py",
    "tests/unit/test_echo_backlog.py",
    "tests/unit/test_venet.py",
    "tests/integration/test_dataplane.py",
]


@pytest.mark.timeout(timing.scaled(300))
def test_ring_device_and_dataplane_tests_pass_on_the_reference_path() -> None:
    env = dict(os.environ, VBUSEMU_JIT="0")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *REFERENCE_SUBSET],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timing.scaled(280),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_control_plane_processes_never_import_numba() -> None:
    code = (
        "import sys\n"
        "import hostemu.broker.server, hostemu.vmm, hostemu.run, hostemu.cli\n"
        "import hostemu.devices.blk, hostemu.devices.console, guestemu.guest\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timing.scaled(60),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_reference_ring_does_not_load_numba() -> None:
    code = (
        "import sys, numpy as np\n"
        "from shared.memory import GuestMemoryMap\n"
        "from shared.virtio import DeviceRing, DriverRing, RingLayout\n"
        "layout = RingLayout(16)\n"
        "mem = GuestMemoryMap(); mem.add(0, 0, np.zeros(1 << 16, dtype=np.uint8))\n"
        "d = DriverRing(mem.translate(0, layout.size), layout, event_idx=True, jit=False)\n"
        "v = DeviceRing.from_layout(mem, 0, layout, event_idx=True, jit=False)\n"
        "d.add_batch(np.arange(8, dtype=np.uint64) * 64 + 0x8000, np.full(8, 64))\n"
        "v.push_used(v.pop_batch().heads, np.zeros(8, dtype=np.int64))\n"
        "print('numba' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timing.scaled(60),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
