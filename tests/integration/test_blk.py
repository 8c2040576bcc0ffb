"""The blk device through real processes: broker, VMM, guest vCPU, blk device process.

The guest writes a pattern (a pure function of seed and sector), flushes, reads it back and
verifies it, and checks that requests past the end of the disk fail. The durability test
SIGKILLs every process right after the guest saw its flush complete and then reads the image
file directly: whatever was acknowledged before the flush must be there.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from guestemu.workloads.blk import first_mismatch
from hostemu.launcher import python_module
from shared import pci_layout as pl
from tests import timing
from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import run_vmm

pytestmark = pytest.mark.timeout(60)

S = pl.SECTOR_SIZE


def blk_vm(name: str, image: Path, capacity: int, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "devices": [
            {"model": "blk", "name": "disk0", "params": {"image": str(image), "capacity": capacity}}
        ],
        "workload": ["--workload", "blk", "--params", json.dumps(params)],
    }


def check_image(image: Path, seed: int, start: int, nsectors: int) -> None:
    with open(image, "rb") as f:
        f.seek(start * S)
        got = np.frombuffer(f.read(nsectors * S), dtype=np.uint8)
    assert got.shape[0] == nsectors * S, f"image holds only {got.shape[0]} of {nsectors * S} bytes"
    bad = first_mismatch(got, seed, start)
    assert bad is None, f"sector {bad} of the image does not hold the written pattern"


def test_write_flush_read_verify_through_every_process(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    capacity = 1 << 21  # 1 GiB, sparse
    count, sectors, start, seed = 64, 16, 1000, 42
    result = run_vmm(
        broker,
        [
            blk_vm(
                "vm0",
                image,
                capacity,
                count=count,
                sectors=sectors,
                start=start,
                seed=seed,
                depth=16,
            )
        ],
    )
    assert result["returncode"] == 0, result
    r = result["results"]["vm0"]
    assert r["ok"] and r["error"] is None, r
    assert r["capacity"] == capacity
    assert r["written_bytes"] == r["read_bytes"] == count * sectors * S
    assert r["flushes"] == 1 and r["mb_per_s_write"] > 0 and r["mb_per_s_read"] > 0
    # doorbells went through the ioeventfd fast path, interrupts came back through irqfds
    assert r["vcpu"]["fast_writes"] == r["doorbells"] > 0
    dev = result["stats"]["vm0"]["devices"]["disk0"]["model"]
    assert (dev["writes"], dev["reads"], dev["flushes"]) == (count, count, 1)
    assert dev["bytes_written"] == dev["bytes_read"] == count * sectors * S
    assert dev["errors"] == dev["out_of_range"] == 2  # the workload's two past-the-end probes
    assert result["errors"] == []
    # the image holds the data, was neither grown by the probes nor filled in
    check_image(image, seed, start, count * sectors)
    st = image.stat()
    assert st.st_size == capacity * S
    assert st.st_blocks * 512 < 64 * count * sectors * S
    assert not broker.connect().state()["objects"]


# ============================================================================ durability


def read_until_event(proc: subprocess.Popen[bytes], name: str, timeout: float) -> dict[str, Any]:
    """The first ``guest_event`` named ``name`` on the VMM's stdout (select, no polling)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.startswith(b"{"):
                continue
            obj: dict[str, Any] = json.loads(line)
            if obj.get("event") == "guest_event" and obj.get("name") == name:
                return obj
            if obj.get("event") == "vmm_done":
                pytest.fail(f"the VMM finished without {name}: {obj}")
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {name} event within {timeout}s")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"the VMM exited (status {proc.wait(timing.scaled(5))}) before {name}")
            buf += chunk


def ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the name may hold spaces


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root``, found by ppid (never by name)."""
    parents = {int(p): ppid_of(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found += kids
        frontier += kids
    return found


@contextlib.contextmanager
def pidfds(pids: list[int], expected_parents: dict[int, int]) -> Iterator[dict[int, int]]:
    """pidfds for ``pids`` that are still the children we found (no pid reuse), closed
    on exit. A pidfd pins the process identity, so signalling and waiting through it cannot
    hit a recycled pid."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # already gone (and reaped by its parent)
            if ppid_of(pid) != expected_parents[pid]:
                os.close(fd)  # the pid was recycled between the scan and the open
                continue
            fds[pid] = fd
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def wait_dead(fds: dict[int, int], timeout: float) -> None:
    """Wait until every pidfd reports its process exited (a pidfd polls readable then)."""
    pending = set(fds.values())
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        assert left > 0, f"processes still alive after SIGKILL: {sorted(fds)}"
        ready, _, _ = select.select(list(pending), [], [], left)
        pending -= set(ready)
    for pid in fds:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # only if we happen to be their reaper


def is_dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_flushed_writes_survive_sigkill_of_every_process(
    broker_factory: Callable[..., BrokerHandle], tmp_path: Path
) -> None:
    # broker_factory, not broker: we kill this one, and the factory only stops (and checks
    # the exit status of) brokers that are still alive.
    broker = broker_factory()
    image = tmp_path / "disk.img"
    count, sectors, start, seed = 40, 8, 7, 99
    spec = [
        blk_vm(
            "vm0",
            image,
            4096,
            count=count,
            sectors=sectors,
            start=start,
            seed=seed,
            depth=8,
            hold_after_flush=True,
        )
    ]
    log: IO[bytes]
    with open(tmp_path / "vmm.log", "wb") as log:
        vmm = subprocess.Popen(
            python_module(
                "hostemu.vmm",
                "--socket",
                broker.path,
                "--spec",
                json.dumps(spec),
                "--timeout",
                str(timing.scaled(50)),
            ),
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        event = read_until_event(vmm, "blk_flushed", timeout=timing.scaled(40))
        assert (event["sectors"], event["seed"], event["start"]) == (count * sectors, seed, start)
        victims = descendants(vmm.pid)  # the guest and device processes (the VMM's children)
        parents = {pid: ppid_of(pid) or 0 for pid in victims}
        assert len(victims) >= 2, victims
        with pidfds(victims, parents) as fds:
            assert len(fds) == len(victims), "a guest or device process died on its own"
            # Everyone at once, the VMM's children first: no process gets to clean up.
            for fd in fds.values():
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            vmm.kill()
            broker.proc.kill()
            vmm.wait(timing.scaled(10))
            wait_dead(fds, timing.scaled(10))
        assert all(is_dead(pid) for pid in victims)
        assert vmm.returncode == -signal.SIGKILL
        assert not broker.proc.alive
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait(timing.scaled(10))
        assert vmm.stdout is not None
        vmm.stdout.close()
    check_image(image, seed, start, count * sectors)
    assert "Traceback" not in (tmp_path / "vmm.log").read_text()
