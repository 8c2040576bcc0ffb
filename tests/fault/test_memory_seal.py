"""A peer truncating a shared region must not kill the others with SIGBUS.

Defense: guest RAM is a memfd sealed with ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``
before its fd leaves the VMM (``shared/memory.py`` says why POSIX shm cannot be). The
kernel then refuses every ``ftruncate`` with EPERM, whoever holds the fd.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

import pytest

from shared.memory import SharedRegion, is_shrink_sealed
from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import echo_vm, run_vmm

pytestmark = pytest.mark.timeout(120)


def test_sealed_region_cannot_be_resized_by_any_holder() -> None:
    with (
        SharedRegion.create(1 << 16, sealed=True) as ram,
        SharedRegion.from_fd(ram.fd.dup(), 1 << 16) as peer,
    ):
        assert ram.sealed and peer.sealed
        for size in (0, 4096, 1 << 17):
            with pytest.raises(OSError) as e:
                os.ftruncate(peer.fd.fd, size)
            assert e.value.errno == errno.EPERM
        with pytest.raises(OSError):  # nor can the seals be changed (F_SEAL_SEAL)
            fcntl.fcntl(peer.fd.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        peer.array[-1] = 0xAB  # the last page is still there, and shared
        assert ram.array[-1] == 0xAB


def test_posix_region_is_reported_unsealed() -> None:
    with SharedRegion.create(4096) as r:
        assert not r.sealed and not is_shrink_sealed(r.fd.fd)
    r_, w_ = os.pipe()
    try:
        assert not is_shrink_sealed(r_)  # not a memory object at all
    finally:
        os.close(r_)
        os.close(w_)


def test_guest_truncating_its_ram_is_refused_and_its_device_and_neighbour_keep_running(
    broker: BrokerHandle,
) -> None:
    hostile = {
        "name": "hostile",
        "devices": [{"model": "echo", "name": "echo0"}],
        "workload": ["--workload", "truncate", "--params", json.dumps({"frames": 64})],
    }
    result = run_vmm(broker, [hostile, echo_vm("neighbour", 2000)])
    r = result["results"]["hostile"]
    assert r["ok"], r
    assert r["sealed"] == {"0": True}
    assert set(r["attempts"].values()) == {"refused: EPERM"}, r["attempts"]
    assert r["frames"] == 128  # the device served before and after the attempts
    assert result["results"]["neighbour"]["ok"], result["results"]["neighbour"]
    assert result["returncode"] == 0, result
