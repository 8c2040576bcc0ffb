"""Fault cases that the foundation already survives (a first slice).

Each test uses real processes and the shared leak guard (fds, /dev/shm, children).
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from shared import wire
from shared.errors import PeerGoneError
from shared.fds import new_eventfd
from shared.loop import EXIT_BROKER_GONE
from tests import timing
from tests.conftest import BrokerHandle
from tests.integration.conftest import Vmm

pytestmark = pytest.mark.timeout(120)


def test_broker_killed_every_client_notices_promptly(vmm: Vmm) -> None:
    """SIGKILL the broker; guest and device see EOF and exit cleanly (each
    reports it before a deadline of a second, scaled)."""
    vm = vmm.channel.vm_create(ngsi=8)
    dev = vmm.channel.device_create(vm, nsignals=1)
    guest, device = vmm.guest(vm), vmm.device(dev)
    until = timing.deadline(1.0)
    vmm.broker.proc.kill()
    for p in (guest, device):
        try:
            p.wait_event("broker_gone", timeout=timing.remaining(until))
        except PeerGoneError as e:
            raise AssertionError(
                f"{p.name} did not report the broker gone within {timing.scaled(1.0):g} s: {e}"
            ) from e
    for p in (guest, device):
        assert p.proc.wait(timing.scaled(10)) == EXIT_BROKER_GONE
    with pytest.raises(PeerGoneError):
        vmm.channel.ping(timeout=timing.scaled(2))


def test_exec_helper_inherits_no_eventfd_or_memory(vmm: Vmm) -> None:
    """Every fd we received is close-on-exec (MSG_CMSG_CLOEXEC)."""
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    for gsi in (1, 2):
        vmm.channel.irqfd_assign(vm, vmm.channel.eventfd_create(), gsi)
        guest.wait_event("irqfd_attached", gsi=gsi)
    fds = guest.call("exec_probe")["fds"]
    assert len(guest.call("stats")["irqfds"]) == 2
    leaked = [f for f in fds if "eventfd" in f or "socket" in f or "/dev/shm" in f or "memfd" in f]
    assert leaked == [], fds


def test_stopped_guest_keeps_bindings_and_signals_coalesce(vmm: Vmm) -> None:
    """SIGSTOP the guest while its irqfd is signaled, then SIGCONT."""
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    handle = vmm.channel.eventfd_create()
    vmm.channel.irqfd_assign(vm, handle, 3)
    guest.wait_event("irqfd_attached", gsi=3)
    os.kill(guest.pid, signal.SIGSTOP)
    try:
        with vmm.channel.handle_fd(handle) as fd:
            for _ in range(10_000):
                os.eventfd_write(fd.fd, 1)
        assert vmm.channel.ping(1) == 1  # the broker is not held up by a stopped consumer
        assert [b["consumer"] for b in vmm.channel.state()["bindings"]] != [None]
    finally:
        os.kill(guest.pid, signal.SIGCONT)
    assert guest.call("wait_total", gsi=3, total=10_000)["delivered"] == 10_000
    assert guest.call("stats")["wakeups"]["3"] <= 2  # queued signals coalesced


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop privileges in a child")
def test_peer_of_another_uid_is_refused_before_any_fd(broker: BrokerHandle) -> None:
    """The 0700 directory stops other users; and even past it, SO_PEERCRED
    refuses a foreign uid before a single byte or fd is exchanged."""

    def try_as_nobody(path: str) -> str:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, try to talk to the broker
            os.close(r)
            result = b"?"
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.settimeout(timing.scaled(5))
                s.connect(path)
                data, _ = wire.encode(wire.Ping(seq=1, token=7))
                try:
                    s.send(data)
                    result = b"answered" if s.recv(4096) else b"closed"
                except OSError:
                    result = b"closed"
            except PermissionError:
                result = b"EACCES"
            except OSError as e:
                result = str(e).encode()
            os.write(w, result)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
        os.waitpid(pid, 0)
        return out

    assert try_as_nobody(broker.path) == "EACCES"  # the private directory
    directory = os.path.dirname(broker.path)
    opened = [os.path.dirname(directory), directory]  # the test's temp dir and the broker's
    for d in opened:
        os.chmod(d, 0o711)
    os.chmod(broker.path, 0o666)
    try:
        assert try_as_nobody(broker.path) == "closed"  # SO_PEERCRED uid check
    finally:
        for d in opened:
            os.chmod(d, 0o700)
        os.chmod(broker.path, 0o600)
    assert "refused pid" in broker.log_text() and "uid 65534" in broker.log_text()
    assert broker.connect().ping(3) == 3


def test_fds_of_wrong_type_and_count_leave_broker_fd_count_unchanged(broker: BrokerHandle) -> None:
    """A seed of the fuzzer: wrong fd types and counts never leak an fd."""
    from shared.fds import send_with_fds

    ok = broker.connect()
    baseline = ok.state()["process"]["open_fds"]
    r, w = os.pipe()
    memfd = os.memfd_create("x")
    try:
        for msg_type, fds in (
            (wire.EventfdImport, [r, memfd]),
            (wire.Ping, [w]),
            (wire.MemoryImport, [r]),
        ):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(broker.path)
            with new_eventfd() as efd:
                data = (
                    wire.HEADER.pack(
                        wire.PROTOCOL_VERSION,
                        msg_type.TYPE,
                        0,
                        len(fds) + 1,
                        0,
                        1,
                        msg_type._STRUCT.size,
                    )
                    + b"\0" * msg_type._STRUCT.size
                )
                send_with_fds(s, data, [*fds, efd.fd])
            s.settimeout(timing.scaled(5))
            assert s.recv(4096)  # an error reply, then EOF
            s.close()
            assert ok.ping(2) == 2
    finally:
        for fd in (r, w, memfd):
            os.close(fd)
    assert ok.state()["process"]["open_fds"] == baseline


def test_client_that_stops_reading_is_dropped_and_others_see_no_delay(broker: BrokerHandle) -> None:
    """A client floods requests and never reads a reply: the broker never
    blocks on it, drops it once its queue overflows, and others are served meanwhile."""
    other = broker.connect()
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    flood.connect(broker.path)
    flood.setblocking(False)
    data, _ = wire.encode(wire.Ping(seq=1, token=1))
    sent = 0
    dropped = False
    deadline = timing.deadline(60)
    bound = timing.scaled(1.0)

    def served() -> None:
        # The other client is served meanwhile: its ping is answered before the bound.
        try:
            assert other.ping(sent, timeout=bound) == sent
        except PeerGoneError as e:
            raise AssertionError(
                f"another client got no answer within {bound:g} s "
                f"(after {sent} unread requests): {e}"
            ) from e

    while not dropped and not timing.expired(deadline):
        try:
            flood.send(data)
            sent += 1
        except BlockingIOError:  # our own buffer is full: check on the others meanwhile
            served()
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
        if sent % 1000 == 0:
            served()
    flood.close()
    assert dropped, f"the broker never dropped a client that sent {sent} unread requests"
    assert other.ping(9) == 9
    assert len(other.state()["connections"]) == 1  # only `other` is left


def test_connect_close_and_assign_deassign_cycles_leave_nothing(broker: BrokerHandle) -> None:
    """CI-sized (VBUSEMU_CYCLES raises it, e.g. to 100000): repeated
    connect/close and assign/deassign keep the broker's fd count flat and its table empty."""
    from shared.channel import Channel

    cycles = int(os.environ.get("VBUSEMU_CYCLES", "3000"))
    ctl = broker.connect()
    baseline = ctl.state()["process"]["open_fds"]
    rss: list[int] = []
    for i in range(cycles):
        if i == cycles // 3:  # after warm-up (allocator arenas, caches): the reference
            rss.append(broker_rss(broker))
        with Channel.connect(broker.path) as ch:
            if i % 10 == 0:  # every tenth also leaves objects behind: a crash is a leave
                vm = ch.vm_create(4)
                ch.irqfd_assign(vm, ch.eventfd_create(), 1)
    vm = ctl.vm_create(8)
    handle = ctl.eventfd_create()
    for i in range(cycles):
        if i == cycles // 3:
            rss.append(broker_rss(broker))
        ctl.irqfd_assign(vm, handle, 1 + i % 7)
        ctl.ioeventfd(vm, handle, 0x1000 + 8 * (i % 64), 4, datamatch=i % 3)
        ctl.ioeventfd(vm, handle, 0x1000 + 8 * (i % 64), 4, datamatch=i % 3, deassign=True)
        ctl.irqfd_deassign(vm, handle, 1 + i % 7)
    ctl.vm_destroy(vm)
    ctl.handle_close(handle)
    state = ctl.state()
    assert not state["objects"] and not state["vms"] and not state["bindings"], state
    assert len(state["connections"]) == 1
    assert state["process"]["open_fds"] == baseline
    # Memory flat: growth after warm-up stays under a bound a per-cycle leak would blow
    # (100,000 cycles leaking 64 bytes each is 6 MiB; raise VBUSEMU_CYCLES to see it).
    end = broker_rss(broker)
    growth = end - max(rss)
    print(f"broker RSS after warm-up {[r >> 10 for r in rss]} KiB, at the end {end >> 10} KiB")
    assert growth < 4 << 20, f"broker RSS grew by {growth >> 10} KiB after warm-up"


def broker_rss(broker: BrokerHandle) -> int:
    """The broker process's resident set size in bytes (VmRSS)."""
    with open(f"/proc/{broker.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/<broker>/status")
