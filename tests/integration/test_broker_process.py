"""The broker as a real process: crashes are leaves, bad input is refused, it stays up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hostemu.broker.server import prepare_socket_path
from hostemu.launcher import start_broker
from shared import wire
from shared.channel import Channel
from shared.errors import BrokerError, ConfigError
from shared.fds import new_eventfd, recv_with_fds, send_with_fds
from shared.loop import EXIT_BROKER_GONE
from shared.wire import Policy
from tests import timing
from tests.conftest import BrokerHandle
from tests.integration.conftest import Vmm

pytestmark = pytest.mark.timeout(120)


def peer_gone(
    ch: Channel, kind: wire.PeerKind, timeout: float = timing.scaled(10)
) -> wire.PeerGone:
    while True:
        msg = ch.next_notice(timeout)
        assert msg is not None, f"no PeerGone({kind.name}) within {timeout}s"
        msg.close_fds()
        if isinstance(msg, wire.PeerGone) and msg.kind == kind:
            return msg


def test_guest_sigkill_is_a_leave_and_others_keep_running(vmm: Vmm) -> None:
    vm_a = vmm.channel.vm_create(ngsi=8)
    vm_b = vmm.channel.vm_create(ngsi=8)
    dev_a = vmm.channel.device_create(vm_a, nsignals=1)
    guest_a, guest_b = vmm.guest(vm_a, "guest-a"), vmm.guest(vm_b, "guest-b")
    device_a = vmm.device(dev_a, "device-a")
    ha, hb = vmm.channel.eventfd_create(), vmm.channel.eventfd_create()
    vmm.channel.irqfd_assign(vm_a, ha, 1)
    vmm.channel.irqfd_assign(vm_b, hb, 1)
    guest_a.wait_event("irqfd_attached")
    guest_b.wait_event("irqfd_attached")

    guest_a.kill()

    assert peer_gone(vmm.channel, wire.PeerKind.GUEST).id == vm_a
    assert device_a.wait_event("peer_gone", kind="guest")["id"] == vm_a
    state = vmm.channel.state()
    vm_state = {v["id"]: v for v in state["vms"]}
    assert vm_state[vm_a]["guest"] is None and vm_state[vm_b]["guest"] is not None
    irq_a = [b for b in state["bindings"] if b.get("vm") == vm_a]
    assert [b["consumer"] for b in irq_a] == [None]  # binding stays with the VM
    # The other VM is unaffected.
    with vmm.channel.handle_fd(hb) as fd:
        os.eventfd_write(fd.fd, 3)
    assert guest_b.call("wait_total", gsi=1, total=3)["delivered"] == 3
    # A restarted guest re-attaches and gets the VM's irqfds again.
    guest_a2 = vmm.guest(vm_a, "guest-a2")
    assert guest_a2.wait_event("irqfd_attached")["gsi"] == 1
    assert vmm.channel.ping(42) == 42


def test_device_sigkill_notifies_owner_and_guest(vmm: Vmm) -> None:
    vm = vmm.channel.vm_create(ngsi=8)
    dev = vmm.channel.device_create(vm, nsignals=1)
    guest = vmm.guest(vm)
    device = vmm.device(dev)
    h = vmm.channel.eventfd_create()
    vmm.channel.shmsignal_assign(dev, 0, h)
    device.wait_event("shmsignal_attached")
    device.kill()
    assert peer_gone(vmm.channel, wire.PeerKind.DEVICE).id == dev
    assert guest.wait_event("peer_gone", kind="device")["id"] == dev
    # Deassign no longer waits for anyone: the consumer is gone.
    vmm.channel.shmsignal_deassign(dev, 0, h)
    assert not vmm.channel.state()["bindings"]


def test_vmm_crash_tears_down_its_vms(broker: BrokerHandle, vmm_factory) -> None:  # type: ignore[no-untyped-def]
    vmm = vmm_factory(broker)
    observer = broker.connect()
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    h = vmm.channel.eventfd_create()
    vmm.channel.irqfd_assign(vm, h, 1)
    guest.wait_event("irqfd_attached")
    vmm.channel.close()  # the VMM's connection ends: like process exit
    assert guest.wait_event("detached")["reason"] in ("teardown", "hup")
    assert guest.proc.wait(timing.scaled(10)) == 0  # PeerGone(VM) makes the guest exit cleanly
    state = observer.state()
    assert not state["objects"] and not state["vms"] and not state["bindings"]


def test_unacknowledged_detach_times_out_and_drops_consumer(broker_factory) -> None:  # type: ignore[no-untyped-def]
    b = broker_factory(ack_timeout=0.3)
    vmm = b.connect()
    vm = vmm.vm_create(ngsi=8)
    h = vmm.eventfd_create()
    with Channel.adopt(vmm.channel_open(wire.Scope.VM, vm)) as silent_guest:
        silent_guest.attach()
        vmm.irqfd_assign(vm, h, 1)
        # The "guest" never reads nor acknowledges: deassign still returns, after the bound.
        vmm.irqfd_deassign(vm, h, 1)
        assert peer_gone(vmm, wire.PeerKind.GUEST).id == vm
        assert not vmm.state()["bindings"]
        with pytest.raises(Exception):  # noqa: B017 - dropped: EOF or reset, either is right
            while True:
                msg = silent_guest.next_notice(timing.scaled(5))
                assert msg is not None
                msg.close_fds()


def test_corrupt_frame_gets_eproto_and_close_fds_are_released(broker: BrokerHandle) -> None:
    ok = broker.connect()
    baseline = ok.state()["process"]["open_fds"]
    for frame in (b"\x00" * 3, b"garbage-garbage-garbage", wire.encode(wire.Ping())[0][:-1]):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(broker.path)
        with new_eventfd() as e1, new_eventfd() as e2:
            send_with_fds(s, frame, [e1.fd, e2.fd])
        got = recv_with_fds(s, wire.MAX_FRAME)
        assert got is not None
        reply = wire.decode(*got)
        assert isinstance(reply, wire.Error) and reply.errno == 71  # EPROTO
        assert recv_with_fds(s, wire.MAX_FRAME) is None  # then the broker hangs up
        s.close()
        assert ok.ping(7) == 7
    assert ok.state()["process"]["open_fds"] == baseline


def test_import_of_wrong_fd_types_is_einval_and_fd_closed(broker: BrokerHandle) -> None:
    ch = broker.connect()
    baseline = ch.state()["process"]["open_fds"]
    r, w = os.pipe()
    memfd = os.memfd_create("x")
    try:
        for fd in (r, memfd):
            from shared.fds import OwnedFd

            with OwnedFd(os.dup(fd)) as dup, pytest.raises(BrokerError) as e:
                ch.eventfd_import(dup)
            assert e.value.name == "EINVAL"
    finally:
        for fd in (r, w, memfd):
            os.close(fd)
    assert ch.state()["process"]["open_fds"] == baseline
    assert ch.ping() == 0


def test_broker_sigterm_is_graceful_and_clients_notice(vmm: Vmm) -> None:
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    path = vmm.broker.path
    assert vmm.broker.proc.stop() == 0
    assert guest.wait_event("broker_gone")
    assert guest.proc.wait(timing.scaled(10)) == EXIT_BROKER_GONE
    assert not os.path.exists(path)
    assert "Traceback" not in vmm.broker.log_text()


def test_vbusemu_ps_shows_both_reference_counts(broker: BrokerHandle) -> None:
    ch = broker.connect()
    vm = ch.vm_create(ngsi=8)
    h = ch.eventfd_create()
    ch.handle_dup(h)
    ch.irqfd_assign(vm, h, 3)
    out = subprocess.run(
        [sys.executable, "-m", "hostemu.cli", "ps", "--socket", broker.path, "--json"],
        capture_output=True,
        text=True,
        timeout=timing.scaled(30),
        check=True,
    )
    state = json.loads(out.stdout)
    (obj,) = [o for o in state["objects"] if o["kind"] == "eventfd"]
    assert (obj["handles"], obj["bindings"]) == (2, 1)
    assert state["bindings"][0]["gsi"] == 3
    table = subprocess.run(
        [sys.executable, "-m", "hostemu.cli", "ps", "--socket", broker.path],
        capture_output=True,
        text=True,
        timeout=timing.scaled(30),
        check=True,
    ).stdout
    assert "BINDINGS" in table and "irqfd" in table


def test_refuses_to_start_over_live_socket_or_non_socket(
    broker: BrokerHandle, sockdir: Path
) -> None:
    with pytest.raises(ConfigError, match="already listening"):
        prepare_socket_path(broker.path)
    d = sockdir / "private"
    d.mkdir(mode=0o700)
    regular = d / "broker.sock"
    regular.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        prepare_socket_path(str(regular))
    link = sockdir / "link"
    link.symlink_to(d)
    with pytest.raises(ConfigError, match="symlink"):
        prepare_socket_path(str(link / "x.sock"))
    (sockdir / "open").mkdir(mode=0o755)
    os.chmod(sockdir / "open", 0o755)
    with pytest.raises(ConfigError, match="0700"):
        prepare_socket_path(str(sockdir / "open" / "x.sock"))
    # A stale socket (nobody listening) is replaced.
    stale = d / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(stale))
    s.close()
    prepare_socket_path(str(stale))
    assert not stale.exists()


def test_broker_process_refuses_live_path_and_exits_nonzero(
    broker: BrokerHandle, sockdir: Path
) -> None:
    log = sockdir / "second.log"
    with open(log, "w") as f, pytest.raises(Exception, match="did not start"):
        start_broker(broker.path, Policy.HUP, stderr=f, timeout=timing.scaled(15))
    assert "already listening" in log.read_text()
    assert broker.connect().ping(1) == 1


def test_socket_and_directory_modes(broker: BrokerHandle) -> None:
    assert os.stat(broker.path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(broker.path)).st_mode & 0o777 == 0o700
