"""The 2009 assign-then-close scenario across real processes, under both policies."""

from __future__ import annotations

import os

import pytest

from hostemu.demo import Scenario
from hostemu.launcher import AgentError
from shared import wire
from shared.errors import BrokerError
from shared.fds import EventNotifier, eventfd_info, new_eventfd
from shared.wire import Policy
from tests.integration.conftest import Vmm

pytestmark = pytest.mark.timeout(120)

GSI = 5


def setup_pair(vmm: Vmm, signals: int = 0) -> tuple[int, int, int, object, object]:
    vm = vmm.channel.vm_create(ngsi=24)
    dev = vmm.channel.device_create(vm, nsignals=2)
    guest = vmm.guest(vm)
    device = vmm.device(dev)
    with new_eventfd(nonblock=False) as fd:
        handle = vmm.channel.eventfd_import(fd)
    vmm.channel.irqfd_assign(vm, handle, GSI)
    guest.wait_event("irqfd_attached", gsi=GSI)
    vmm.channel.shmsignal_assign(dev, 0, handle)
    device.wait_event("shmsignal_attached", sigid=0)
    return vm, dev, handle, guest, device


def eventfd_obj(vmm: Vmm) -> dict[str, object] | None:
    objs = [o for o in vmm.channel.state()["objects"] if o["kind"] == "eventfd"]
    return objs[0] if objs else None


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name.lower())
def test_demo_scenario_passes(policy: Policy) -> None:
    lines: list[str] = []
    report = Scenario(policy, signals=300, out=lines.append).run()
    assert report.ok, "\n".join(lines)
    assert report.signaled == (300 if policy is Policy.HUP else 600)
    assert report.delivered + report.drained_at_detach == report.signaled
    assert report.broker_fds_after == report.broker_fds_before
    expected = ["hup", "hup"] if policy is Policy.HUP else ["deassign", "deassign"]
    assert report.detach_reasons == expected


def test_hup_close_detaches_both_sides_and_closes_broker_fd(vmm: Vmm) -> None:
    _, _, handle, guest, device = setup_pair(vmm)
    fds_before_close = vmm.broker_fds()
    device.call("signal", sigid=0, count=500)
    assert guest.call("wait_total", gsi=GSI, total=500)["delivered"] == 500
    obj = eventfd_obj(vmm)
    assert obj is not None and (obj["handles"], obj["bindings"]) == (1, 2)

    vmm.channel.handle_close(handle)  # returns only after both sides acknowledged

    g = guest.wait_event("detached")
    d = device.wait_event("detached")
    assert (g["reason"], g["gsi"], d["reason"], d["sigid"]) == ("hup", GSI, "hup", 0)
    assert eventfd_obj(vmm) is None
    assert vmm.broker_fds() == fds_before_close - 1  # its own dup is closed
    with pytest.raises(AgentError, match="not bound"):
        device.call("signal", sigid=0, count=1)
    stats = guest.call("stats")
    assert stats["irqfds"] == [] and stats["delivered"][str(GSI)] == 500
    assert not vmm.channel.state()["bindings"]


def test_refcount_bindings_keep_eventfd_alive_until_deassign(vmm_factory) -> None:  # type: ignore[no-untyped-def]
    vmm = vmm_factory(policy=Policy.REFCOUNT)
    vm, dev, handle, guest, device = setup_pair(vmm)
    vmm.channel.handle_close(handle)
    obj = eventfd_obj(vmm)
    assert obj is not None and (obj["handles"], obj["bindings"]) == (0, 2)
    device.call("signal", sigid=0, count=400)
    assert guest.call("wait_total", gsi=GSI, total=400)["delivered"] == 400

    vmm.channel.shmsignal_deassign(dev, 0)
    assert device.wait_event("detached")["reason"] == "deassign"
    obj = eventfd_obj(vmm)
    assert obj is not None and (obj["handles"], obj["bindings"]) == (0, 1)
    fds = vmm.broker_fds()
    vmm.channel.irqfd_deassign(vm, None, GSI)
    assert guest.wait_event("detached")["reason"] == "deassign"
    assert eventfd_obj(vmm) is None
    assert vmm.broker_fds() == fds - 1
    with pytest.raises(AgentError):
        device.call("signal", sigid=0, count=1)


def test_no_interrupt_after_irqfd_deassign_returns(vmm: Vmm) -> None:
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    handle = vmm.channel.eventfd_create()
    with vmm.channel.handle_fd(handle) as fd:
        vmm.channel.irqfd_assign(vm, handle, 3)
        guest.wait_event("irqfd_attached", gsi=3)
        writer = EventNotifier(fd)
        for _ in range(50):
            writer.notify(1)
        vmm.channel.irqfd_deassign(vm, handle, 3)
        after = guest.call("stats")
        for _ in range(50):  # the VMM still holds the file: writes land, nobody injects
            writer.notify(1)
        final = guest.call("stats")
    assert final["delivered"] == after["delivered"]
    total = int(after["delivered"].get("3", 0)) + int(after["drained_at_detach"].get("3", 0))
    assert total == 50
    vmm.channel.handle_close(handle)


def test_pending_signal_at_assign_is_one_interrupt_and_stays_in_the_eventfd(vmm: Vmm) -> None:
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    handle = vmm.channel.eventfd_create(initval=7)  # already pending
    vmm.channel.irqfd_assign(vm, handle, 2)
    guest.wait_event("irqfd_attached", gsi=2)  # reported after the attach-time injection
    stats = guest.call("stats")
    assert (stats["wakeups"], stats["delivered"].get("2", 0)) == ({"2": 1}, 0)
    with vmm.channel.handle_fd(handle) as fd:
        info = eventfd_info(fd.fileno())
        assert info is not None and info.count == 7  # like KVM: injected, not read
        os.eventfd_write(fd.fileno(), 1)  # the next write takes it along
        assert guest.call("wait_total", gsi=2, total=8)["delivered"] == 8
        info = eventfd_info(fd.fileno())
        assert info is not None and info.count == 0
    assert guest.call("stats")["wakeups"] == {"2": 2}


def test_resample_eoi_signals_resamplefd(vmm: Vmm) -> None:
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    trigger = vmm.channel.eventfd_create()
    resample = vmm.channel.eventfd_create()
    vmm.channel.irqfd_assign(vm, trigger, 4, resample_handle=resample)
    assert guest.wait_event("irqfd_attached", gsi=4)["level"] is True
    with vmm.channel.handle_fd(trigger) as t, vmm.channel.handle_fd(resample) as r:
        EventNotifier(t).notify(1)
        guest.call("wait_total", gsi=4, total=1)
        assert os.eventfd_read(r.fd) == 1  # the guest's EOI signaled the resamplefd
    assert guest.call("stats")["eois"] == {"4": 1}


def test_held_interrupts_keep_a_level_line_asserted_until_taken(vmm: Vmm) -> None:
    """``hold_interrupts``: the guest behaves like a vCPU with interrupts disabled -- the
    line stays asserted, later signals are read but inject nothing, and only
    ``take_interrupts`` EOIs it (signaling the resamplefd)."""
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    trigger = vmm.channel.eventfd_create()
    resample = vmm.channel.eventfd_create()
    vmm.channel.irqfd_assign(vm, trigger, 4, resample_handle=resample)
    guest.wait_event("irqfd_attached", gsi=4)
    assert guest.call("hold_interrupts", hold=True)["took"] == []
    with vmm.channel.handle_fd(trigger) as t, vmm.channel.handle_fd(resample) as r:

        def resampled() -> int:
            info = eventfd_info(r.fileno())
            assert info is not None
            return info.count

        EventNotifier(t).notify(1)
        stats = guest.call("stats", settle=True)  # every signal made before is delivered
        assert (stats["level"], stats["requested"], stats["wakeups"]) == ([4], [4], {"4": 1})
        assert resampled() == 0
        EventNotifier(t).notify(2)
        stats = guest.call("stats", settle=True)
        assert (stats["wakeups"], stats["delivered"]) == ({"4": 1}, {"4": 3})
        assert guest.call("take_interrupts")["took"] == [4]
        assert resampled() == 1 and guest.call("stats")["level"] == []
        assert guest.call("take_interrupts")["took"] == []
        EventNotifier(t).notify(1)
        assert guest.call("stats", settle=True)["level"] == [4]
        assert guest.call("hold_interrupts", hold=False)["took"] == [4]  # sti takes it
        assert resampled() == 2
        EventNotifier(t).notify(1)  # interrupts on again: taken and EOI'd at once
        guest.call("wait_total", gsi=4, total=5)
        assert resampled() == 3
    assert guest.call("stats")["eois"] == {"4": 3}


def test_irqfd_ebusy_across_vms_and_reimport(vmm: Vmm) -> None:
    vm1 = vmm.channel.vm_create(ngsi=8)
    vm2 = vmm.channel.vm_create(ngsi=8)
    with new_eventfd() as fd:
        h1 = vmm.channel.eventfd_import(fd)
        h2 = vmm.channel.eventfd_import(fd)  # same kernel eventfd: same broker object
    vmm.channel.irqfd_assign(vm1, h1, 1)
    with pytest.raises(BrokerError) as e:
        vmm.channel.irqfd_assign(vm2, h2, 1)
    assert e.value.name == "EBUSY"
    assert len([o for o in vmm.channel.state()["objects"] if o["kind"] == "eventfd"]) == 1


def test_ioeventfd_attach_reaches_guest_fast_path(vmm: Vmm) -> None:
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    handle = vmm.channel.eventfd_create()
    vmm.channel.ioeventfd(vm, handle, 0x1000, 4, datamatch=2)
    guest.wait_event("ioeventfd_attached", addr=0x1000)
    assert guest.call("io_write", addr=0x1000, len=4, value=2)["hit"] is True
    assert guest.call("io_write", addr=0x1000, len=4, value=3)["hit"] is False
    with vmm.channel.handle_fd(handle) as fd:
        assert os.eventfd_read(fd.fd) == 1
    # ioeventfds have no HUP path: closing the last handle leaves them bound
    vmm.channel.handle_close(handle)
    assert [b["kind"] for b in vmm.channel.state()["bindings"]] == ["ioeventfd"]
    assert guest.call("io_write", addr=0x1000, len=4, value=2)["hit"] is True


def test_scoped_channel_cannot_act_outside_its_object(vmm: Vmm) -> None:
    from hostemu.launcher import spawn_guest  # noqa: F401 - documents who normally uses it
    from shared.channel import Channel

    vm = vmm.channel.vm_create(ngsi=8)
    other = vmm.channel.vm_create(ngsi=8)
    with Channel.adopt(vmm.channel.channel_open(wire.Scope.VM, vm)) as ch:
        hello = ch.hello()
        assert (hello.scope, hello.target) == (wire.Scope.VM, vm)
        for attempt in (
            lambda: ch.vm_create(4),
            lambda: ch.vm_destroy(other),
            lambda: ch.irqfd_deassign(other, None, 1),
            lambda: ch.state(),
        ):
            with pytest.raises(BrokerError) as e:
                attempt()
            assert e.value.name == "EPERM"
        ch.attach()
        with Channel.adopt(vmm.channel.channel_open(wire.Scope.VM, vm)) as second:
            with pytest.raises(BrokerError) as e:
                second.attach()
            assert e.value.name == "EBUSY"


def test_masked_gsi_keeps_signals_pending_until_unmask(vmm: Vmm) -> None:
    vm = vmm.channel.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    handle = vmm.channel.eventfd_create()
    vmm.channel.irqfd_assign(vm, handle, 6)
    guest.wait_event("irqfd_attached", gsi=6)
    assert guest.call("mask", gsi=6)["masked"] == [6]
    with vmm.channel.handle_fd(handle) as fd:
        for _ in range(3):
            os.eventfd_write(fd.fd, 1)
        stats = guest.call("stats")  # a round trip through the guest's loop: it ran
        assert stats["delivered"].get("6", 0) == 0
        assert guest.call("unmask", gsi=6)["masked"] == []
        assert guest.call("wait_total", gsi=6, total=3)["delivered"] == 3
    assert guest.call("stats")["wakeups"]["6"] == 1  # coalesced into one interrupt
