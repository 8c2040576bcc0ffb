"""The 2009 assign-then-close scenario, acted out by real processes.

This process plays the qemu-like VMM. It starts a broker (the host kernel), creates a
VM and a vbus device, starts a guest process and a device process on scoped channels,
then does exactly what the LKML thread describes::

    fd = eventfd(0, 0)
    ioctl(kvmfd,  KVM_IRQFD_ASSIGN,      {fd, gsi})    # consumer: the guest
    ioctl(vbusfd, VBUS_SHMSIGNAL_ASSIGN, {sigid, fd})  # producer: the device
    close(fd)

and prints, step by step, the broker's two reference counts for that eventfd. Under
``hup`` the close releases the file: both sides get a HUP and detach. Under
``refcount`` the bindings keep the eventfd alive until the explicit DEASSIGNs. Either
way the broker's real fd is closed at the end and its open-fd count returns to where
it started. Every check is real; a failed one makes the demo exit non-zero.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hostemu.launcher import AgentError, ManagedProcess, spawn_device, spawn_guest, start_broker
from shared.channel import Channel
from shared.fds import new_eventfd
from shared.wire import Policy, Scope

GSI = 5
SIGID = 0


@dataclass
class ScenarioReport:
    policy: Policy
    signaled: int = 0
    delivered: int = 0
    drained_at_detach: int = 0
    detach_reasons: list[str] = field(default_factory=list)
    broker_fds_before: int = -1
    broker_fds_after: int = -1
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class Scenario:
    """One run of the scenario under one release policy."""

    def __init__(
        self,
        policy: Policy,
        *,
        signals: int = 1000,
        out: Callable[[str], None] = print,
        stderr: Any = None,
    ) -> None:
        self.policy = policy
        self.signals = signals
        self.out = out
        self.stderr = stderr
        self.report = ScenarioReport(policy)
        self.step_no = 0

    def step(self, text: str) -> None:
        self.step_no += 1
        self.out(f"  [{self.step_no:2}] {text}")

    def check(self, cond: bool, what: str) -> None:
        if not cond:
            self.report.failures.append(what)
            self.out(f"       FAILED: {what}")

    def refs(self, vmm: Channel, obj_id: int) -> str:
        state = vmm.state()
        fds = state["process"]["open_fds"]
        for obj in state["objects"]:
            if obj["id"] == obj_id:
                return (
                    f"eventfd #{obj_id}: handles={obj['handles']} "
                    f"bindings={obj['bindings']}  (broker open fds: {fds})"
                )
        return f"eventfd #{obj_id}: released, broker fd closed  (broker open fds: {fds})"

    def run(self) -> ScenarioReport:
        with tempfile.TemporaryDirectory(prefix="vbusemu-demo-") as tmp:
            os.chmod(tmp, 0o700)
            path = os.path.join(tmp, "broker.sock")
            broker = start_broker(path, self.policy, stderr=self.stderr, stdout=self.stderr)
            procs: list[ManagedProcess] = []
            try:
                with Channel.connect(path) as vmm:
                    self._play(vmm, procs)
            finally:
                for p in procs:
                    p.stop()
                status = broker.stop()
                self.check(status == 0, f"broker exited with status {status}")
        return self.report

    def _play(self, vmm: Channel, procs: list[ManagedProcess]) -> None:
        r = self.report
        vm = vmm.vm_create(ngsi=24)
        dev = vmm.device_create(vm, nsignals=1)
        self.step(
            f"broker up (policy={self.policy.name.lower()}); VM {vm} with 24 gsi and an "
            f"interrupt controller; vbus device {dev} with 1 shm-signal"
        )
        guest = spawn_guest(vmm.channel_open(Scope.VM, vm), "guest", stderr=self.stderr)
        procs.append(guest)
        device = spawn_device(vmm.channel_open(Scope.DEVICE, dev), "device", stderr=self.stderr)
        procs.append(device)
        guest.wait_event("attached")
        device.wait_event("attached")
        self.step(
            f"guest process (pid {guest.pid}) and device process (pid {device.pid}) "
            "attached on their scoped channels"
        )
        r.broker_fds_before = vmm.state()["process"]["open_fds"]

        with new_eventfd(nonblock=False) as fd:  # fd = eventfd(0, 0)
            handle = vmm.eventfd_import(fd)
        obj_id = next(o["id"] for o in vmm.state()["objects"] if o["kind"] == "eventfd")
        self.step(
            f"VMM: fd = eventfd(0, 0), handed to the broker as handle {handle}; the "
            f"VMM's own copy is closed -> {self.refs(vmm, obj_id)}"
        )

        vmm.irqfd_assign(vm, handle, GSI)
        guest.wait_event("irqfd_attached", gsi=GSI)
        self.step(
            f"KVM_IRQFD_ASSIGN {{fd, gsi {GSI}}}: the guest got the eventfd -> "
            f"{self.refs(vmm, obj_id)}"
        )
        vmm.shmsignal_assign(dev, SIGID, handle)
        device.wait_event("shmsignal_attached", sigid=SIGID)
        self.step(
            f"VBUS_SHMSIGNAL_ASSIGN {{device {dev}, sigid {SIGID}, fd}}: the device got "
            f"it -> {self.refs(vmm, obj_id)}"
        )

        self._signal(device, guest, expect_total=self.signals)
        vmm.handle_close(handle)
        self.step(f"close(fd) -> {self.refs(vmm, obj_id)}")

        if self.policy is Policy.HUP:
            for who in (guest, device):
                ev = who.wait_event("detached")
                r.detach_reasons.append(ev["reason"])
                r.drained_at_detach += int(ev.get("drained", 0))
                self.check(ev["reason"] == "hup", f"{who.name} detached for {ev['reason']}")
            self.step(
                f"HUP: the guest detached its irqfd and the device its shm-signal "
                f"(reasons: {', '.join(r.detach_reasons)})"
            )
            try:
                device.call("signal", sigid=SIGID, count=1)
                self.check(False, "the device could still signal after HUP")
            except AgentError:
                self.step("the device can no longer signal: its binding is gone")
        else:
            self.check(
                f"eventfd #{obj_id}: handles=0 bindings=2" in self.refs(vmm, obj_id),
                "the bindings should keep the eventfd alive after close",
            )
            self._signal(device, guest, expect_total=2 * self.signals)
            vmm.shmsignal_deassign(dev, SIGID)
            ev = device.wait_event("detached")
            r.detach_reasons.append(ev["reason"])
            self.step(f"VBUS_SHMSIGNAL_DEASSIGN {{sigid {SIGID}}} -> {self.refs(vmm, obj_id)}")
            vmm.irqfd_deassign(vm, None, GSI)
            ev = guest.wait_event("detached")
            r.detach_reasons.append(ev["reason"])
            r.drained_at_detach += int(ev.get("drained", 0))
            self.step(f"KVM_IRQFD_DEASSIGN {{gsi {GSI}}} -> {self.refs(vmm, obj_id)}")

        stats = guest.call("stats")
        r.delivered = int(stats["delivered"].get(str(GSI), 0))
        self.check(
            r.delivered + r.drained_at_detach == r.signaled,
            f"guest drained {r.delivered}+{r.drained_at_detach}, device signaled {r.signaled}",
        )
        self.check(not stats["irqfds"], "the guest still holds an irqfd")
        state = vmm.state()
        r.broker_fds_after = state["process"]["open_fds"]
        self.check(
            all(o["id"] != obj_id for o in state["objects"]), "the broker still holds the eventfd"
        )
        self.check(
            r.broker_fds_after == r.broker_fds_before,
            f"broker open fds {r.broker_fds_before} -> {r.broker_fds_after}",
        )
        self.step(
            f"guest drained {r.delivered} of {r.signaled} signals on gsi {GSI} "
            f"(+{r.drained_at_detach} at detach); broker open fds "
            f"{r.broker_fds_before} -> {r.broker_fds_after}"
        )

        vmm.vm_destroy(vm)
        for p in (guest, device):
            status = p.proc.wait(10)
            self.check(status == 0, f"{p.name} exited with status {status}")
        self.check(not vmm.state()["objects"], "broker objects left after VM teardown")
        self.step("VM destroyed: guest and device got peer-gone and exited; broker table empty")

    def _signal(self, device: ManagedProcess, guest: ManagedProcess, expect_total: int) -> None:
        sent = int(device.call("signal", sigid=SIGID, count=self.signals)["signaled"])
        self.report.signaled += sent
        got = guest.call("wait_total", gsi=GSI, total=expect_total, timeout=20)
        stats = guest.call("stats")
        self.step(
            f"device signaled {sent} times; guest counted {got['delivered']} on gsi "
            f"{GSI} in {stats['wakeups'].get(str(GSI), 0)} interrupts (coalesced)"
        )


def run_demo(
    policies: list[Policy], *, signals: int = 1000, out: Callable[[str], None] = print
) -> int:
    ok = True
    for policy in policies:
        out(f"== the 2009 scenario, release policy '{policy.name.lower()}' ==")
        report = Scenario(policy, signals=signals, out=out).run()
        out(f"  => {'OK' if report.ok else 'FAILED: ' + '; '.join(report.failures)}")
        ok = ok and report.ok
    return 0 if ok else 1
