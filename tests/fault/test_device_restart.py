"""A device process killed with requests outstanding.

Without restarts the guest fails fast (tests/integration/test_device_death.py). With
``restarts`` the VMM starts a new device process once the old one is gone; it attaches on
a fresh scoped channel, the broker resends the memory slots, the kickfds and the
interrupt eventfds, the VMM replays the enabled queues with ``resume`` and the device
resumes each at the used ring's index (re-taking what the dead process took but never
completed), looks at every ring once and interrupts the driver once. The guest's vCPU
waits for the device through a grace period instead of failing.

Oracle: the blk workload writes a pattern, flushes, reads everything back and verifies it
(every acknowledged write is there, at its place); the test then checks the image file
itself. Killing the device more times than it may be restarted fails the guest within
the grace period, with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostemu.launcher import python_module
from tests import timing
from tests.conftest import BrokerHandle
from tests.integration.test_blk import S, blk_vm, check_image
from tests.integration.test_device_death import children_of, cmdline, read_until

pytestmark = pytest.mark.timeout(120)

GRACE = timing.scaled(20)
"""How long a guest waits for its restarted device (a liveness bound)."""


def start_vmm(broker: BrokerHandle, vm: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        python_module(
            "hostemu.vmm",
            "--socket",
            broker.path,
            "--spec",
            json.dumps([vm]),
            "--timeout",
            str(timing.scaled(90)),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def running_vmm(broker: BrokerHandle, vm: dict[str, Any]) -> Iterator[subprocess.Popen[str]]:
    """A VMM process for ``vm``; a failed assertion shows its stderr; it must not have
    printed a traceback; it is killed (by pid) if still running."""
    vmm = start_vmm(broker, vm)
    try:
        yield vmm
    except AssertionError as e:
        raise AssertionError(f"{e}\nVMM stderr:\n{finish(vmm)}") from None
    finally:
        err = finish(vmm)
    assert "Traceback" not in err, err


def device_pid(vmm: subprocess.Popen[str]) -> int:
    (pid,) = [p for p in children_of(vmm.pid) if "hostemu.devices" in cmdline(p)]
    return pid


def finish(vmm: subprocess.Popen[str]) -> str:
    if vmm.poll() is None:
        vmm.kill()
        vmm.wait(timing.scaled(10))
    err = vmm.stderr.read() if vmm.stderr is not None and not vmm.stderr.closed else ""
    for pipe in (vmm.stdout, vmm.stderr):
        if pipe is not None:
            pipe.close()
    return err


def restartable_blk(image: Path, restarts: int, grace: float, **params: Any) -> dict[str, Any]:
    vm = blk_vm("vm0", image, 1 << 20, **params)
    vm["devices"][0]["restarts"] = restarts
    vm["device_grace"] = grace
    return vm


def test_blk_device_killed_mid_write_is_restarted_and_no_acknowledged_write_is_lost(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    count, sectors, start, seed = 3000, 8, 64, 7
    with running_vmm(
        broker,
        restartable_blk(
            image,
            2,
            GRACE,
            count=count,
            sectors=sectors,
            start=start,
            seed=seed,
            depth=16,
            progress_every=200,
        ),
    ) as vmm:
        deadline = timing.deadline(60)
        for kill in range(2):  # twice, each time with writes in flight
            read_until(vmm, "blk_progress", deadline)
            victim = device_pid(vmm)
            os.kill(victim, signal.SIGKILL)
            restarted = read_until(vmm, "device_restarted", deadline)
            assert restarted["old_pid"] == victim and restarted["restart"] == kill + 1
        done = read_until(vmm, "vmm_done", deadline)
        result = done["results"]["vm0"]
        assert result["ok"], (result, done["errors"])
        assert result["written_bytes"] == count * sectors * S
        assert result["read_bytes"] == count * sectors * S  # read back and verified
        assert not done["errors"], done["errors"]
        counters = done["stats"]["vm0"]["devices"]["disk0"]["counters"]
        assert counters["queues_resumed"] == 1, counters  # the last process resumed once
        assert vmm.wait(timing.scaled(30)) == 0
    check_image(image, seed, start, count * sectors)
    state = broker.connect().state()
    assert not state["vms"] and not state["objects"], state


def test_device_killed_past_its_restarts_fails_the_guest_within_the_grace(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    grace = timing.scaled(2.0)  # long enough for the first restart on a busy machine
    with running_vmm(
        broker,
        restartable_blk(
            tmp_path / "disk.img", 1, grace, count=100_000, sectors=8, depth=16, progress_every=200
        ),
    ) as vmm:
        deadline = timing.deadline(60)
        read_until(vmm, "blk_progress", deadline)
        os.kill(device_pid(vmm), signal.SIGKILL)
        read_until(vmm, "device_restarted", deadline)
        read_until(vmm, "blk_progress", deadline)  # the restarted device serves
        os.kill(device_pid(vmm), signal.SIGKILL)  # no restart left
        # the guest gives up after the grace: reported before this deadline, no hang
        done = read_until(vmm, "vmm_done", time.monotonic() + grace + timing.scaled(10))
        result = done["results"]["vm0"]
        assert not result["ok"] and "gone" in result["error"], result
        assert any("exited" in e for e in done["errors"]), done["errors"]
        assert vmm.wait(timing.scaled(30)) == 1


def test_device_killed_before_it_attached_is_restarted_again(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Regression (found by the soak): a process killed before its Attach never gets a
    PeerGone from the broker; the VMM waited for one forever instead of restarting it."""
    image = tmp_path / "disk.img"
    count, sectors, seed = 2000, 8, 3
    with running_vmm(
        broker,
        restartable_blk(
            image, 3, GRACE, count=count, sectors=sectors, seed=seed, depth=16, progress_every=200
        ),
    ) as vmm:
        deadline = timing.deadline(60)
        read_until(vmm, "blk_progress", deadline)
        os.kill(device_pid(vmm), signal.SIGKILL)
        first = read_until(vmm, "device_restarted", deadline)
        os.kill(first["pid"], signal.SIGKILL)  # at once: Python has not even started yet
        second = read_until(vmm, "device_restarted", deadline)
        assert second["old_pid"] == first["pid"]
        done = read_until(vmm, "vmm_done", deadline)
        assert done["results"]["vm0"]["ok"], done
        assert vmm.wait(timing.scaled(30)) == 0
    check_image(image, seed, 0, count * sectors)
