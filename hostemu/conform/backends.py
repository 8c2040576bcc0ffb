"""The two backends a scenario runs on: the real KVM, and vbusemu's broker.

Both take the same :class:`~hostemu.conform.scenarios.Step` s and return the same kind of
observable (a dict): ``result`` (``ok`` or the errno name), ``exit`` for guest accesses
(the exits to userspace it caused, or ``absorbed``), ``injected`` where a step may raise
an interrupt (the lines among gsi 0-23 that were raised; only when VM ``a`` has an
in-kernel irqchip), ``took`` for a ``take`` step (the gsis the guest took and EOI'd, in
order), ``asserted`` after any step that leaves a legacy line (gsi 0-15) of VM ``a`` held
high (a resampling irqfd's level; left out when none is), and ``counters`` (every open
eventfd's count).

The guest on both sides runs with interrupts disabled: an injection stays latched (and
a resampling irqfd's line asserted) until a ``take`` step, which enables interrupts for
a moment -- the guest takes each latched request and EOIs it -- and disables them again.

How each side observes
----------------------
* **kernel** -- ioctls through :mod:`hostemu.kvm`; a guest access is a real-mode program
  on vCPU 0 (an access is absorbed when ``KVM_RUN`` returned no exit for it); injection
  is the PIC's interrupt request register (``KVM_GET_IRQCHIP``) for gsi 0-15 and, for
  16-23, vCPU 0's local APIC request register (``KVM_GET_LAPIC``; the IOAPIC pins are
  routed there with one vector each), both cleared before the step and what was latched
  before put back after it (the guest has not taken it yet); a line's level is the
  PIC's ``last_irr``; a ``take`` step is :meth:`~hostemu.kvm.Vcpu.take_interrupts`;
  counters come from ``/proc/self/fdinfo``.
* **broker** -- a broker process, the :class:`~shared.channel.Channel` client API as the
  VMM, and a real guest process (``guestemu.guest``) attached to VM ``a``. A write is the
  guest's own ioeventfd match (its table is fed by the broker's attach notices): absorbed
  means the guest signaled the eventfd itself, a miss is what the guest turns into an I/O
  exit (the exit carries exactly the access's bus, address, width and value); a read
  always exits (the guest never consults its table for reads). Injection is the guest's
  per-gsi wakeup count, read after the guest delivered every signal made before (the
  ``settle`` of its ``stats`` command). The guest holds interrupts
  (``hold_interrupts``); a ``take`` step is its ``take_interrupts`` command, a line's
  level its ``level``. Counters are read from the VMM's copy of each eventfd (the same
  kernel counter the broker and the guest hold). Before each access, signal or take the
  backend waits until the guest holds exactly the irqfds and ioeventfds the broker has
  bound for VM ``a``, so a notice still in flight is not mistaken for a difference.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostemu import kvm as K
from hostemu import kvm_long as L
from hostemu import kvm_real as R
from hostemu.conform.scenarios import BADFD, Scenario, Step
from shared.errors import BrokerError

Observation = dict[str, Any]

INJECT_QUIET = 0.04
"""Seconds with nothing raised after which a step is taken not to inject."""
INJECT_PATIENT = 1.0
"""The same, for a run that confirms a difference (see
:meth:`hostemu.conform.run.Conformance.run`): KVM injects a PIC or IOAPIC route's irqfd
signal from the system workqueue, and vbusemu's guest from its own process, so on a loaded
machine either may come later than the quick window."""
OBSERVED_GSIS = 24
"""gsi 0-15 (the PIC) and 16-23 (IOAPIC-only pins)."""
MAY_INJECT = frozenset({"irqfd", "signal", "write"})
ACCESSES = frozenset({"write", "read"})
GUEST_STEPS = ACCESSES | {"take"}
"""Steps the guest of VM ``a`` carries out (it must hold every binding first)."""
LEVEL_GSIS = 16
"""gsi 0-15: the PIC shows a line's level. The IOAPIC keeps none for the edge-programmed
pins 16-23."""
BAD_KERNEL_FD = 1 << 30
BAD_HANDLE = 0x7FFF_FFF0
MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


def _errname(e: OSError | BrokerError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _wait_for(probe: Callable[[], int], quiet: float) -> int:
    """Poll ``probe`` until it is non-zero (return it) or stays zero for ``quiet`` s."""
    deadline = time.monotonic() + quiet
    while True:
        got = probe()
        if got:
            time.sleep(quiet / 8)  # a second line raised by the same step comes with it
            return got | probe()
        if time.monotonic() >= deadline:
            return got
        time.sleep(0.002)


def _bits(mask: int) -> list[int]:
    return [i for i in range(OBSERVED_GSIS) if mask >> i & 1]


class KernelBackend:
    """One scenario on the real KVM."""

    name = "kernel"

    def __init__(self, kvm: K.Kvm, scenario: Scenario, quiet: float = INJECT_QUIET) -> None:
        self.kvm = kvm
        self.scenario = scenario
        self.quiet = quiet  # how long a step that raises nothing is watched
        self.vms: dict[str, K.Vm] = {}
        self.fds: dict[str, int] = {}
        self.other: dict[str, int] = {}  # open descriptors that are not eventfds
        self._phys_bits: int | None = None

    def __enter__(self) -> KernelBackend:
        vm = self.vms["a"] = self.kvm.create_vm(irqchip=self.scenario.irqchip)
        try:
            if vm.irqchip:
                vm.route_ioapic_pins()
                vm.init_interrupts()
        except BaseException:
            vm.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for vm in self.vms.values():
            vm.close()
        for fd in (*self.fds.values(), *self.other.values()):
            os.close(fd)
        self.fds.clear()
        self.other.clear()

    def _fd(self, name: str | None) -> int:
        if name is None:
            return 0
        if name == BADFD:
            return BAD_KERNEL_FD
        return self.fds.get(name, self.other.get(name, BAD_KERNEL_FD))

    def _vm(self, name: str) -> K.Vm:
        return self.vms[name]

    def step(self, step: Step) -> Observation:
        a = step.args
        obs: Observation = {}
        vm_a = self.vms["a"]
        watch = step.op in MAY_INJECT and vm_a.irqchip and not vm_a.closed
        if watch:
            # What the step raises is what is latched after it; what was latched before
            # is put back afterwards, for a later take step.
            latched = vm_a.latched()
            vm_a.clear_pic_irr()
            vm_a.clear_ioapic_requests()
        try:
            if step.op == "eventfd":
                flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
                if a.get("semaphore"):
                    flags |= os.EFD_SEMAPHORE
                self.fds[a["name"]] = os.eventfd(a["initval"], flags)
            elif step.op == "memfd":
                self.other[a["name"]] = os.memfd_create("conform", os.MFD_CLOEXEC)
            elif step.op == "vm":
                self.vms[a["name"]] = self.kvm.create_vm(irqchip=a["irqchip"])
            elif step.op in ("irqfd", "irqfd_deassign"):
                flags = a["flags"]
                if step.op == "irqfd_deassign":
                    flags |= K.KVM_IRQFD_FLAG_DEASSIGN
                elif a["resample"] is not None:
                    flags |= K.KVM_IRQFD_FLAG_RESAMPLE
                self._vm_fd(a["vm"])
                self._vm(a["vm"]).irqfd(
                    self._fd(a["efd"]), a["gsi"], flags, self._fd(a.get("resample"))
                )
            elif step.op in ("ioeventfd", "ioeventfd_deassign"):
                flags = a["flags"]
                if a["datamatch"] is not None:
                    flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
                if a["pio"]:
                    flags |= K.KVM_IOEVENTFD_FLAG_PIO
                if step.op == "ioeventfd_deassign":
                    flags |= K.KVM_IOEVENTFD_FLAG_DEASSIGN
                self._vm_fd(a["vm"])
                self._vm(a["vm"]).ioeventfd(
                    self._fd(a["efd"]), a["addr"], a["len"], flags, a["datamatch"] or 0
                )
            elif step.op in ACCESSES:
                exits = self._access(vm_a, step.op == "write", a)
                obs["exit"] = [e.describe() for e in exits] or "absorbed"
            elif step.op == "signal":
                os.eventfd_write(self.fds[a["efd"]], a["n"])
            elif step.op == "take":
                if vm_a.closed:
                    raise ValueError("a take step needs VM a's vCPU: the VM is gone")
                obs["took"] = vm_a.vcpu().take_interrupts()
            elif step.op == "close":
                os.close(self.fds.pop(a["efd"]))
                self._flush_irqfd_cleanup()
            elif step.op == "teardown":
                self._vm(a["vm"]).close()
            else:
                raise ValueError(f"unknown step {step.op!r}")
            obs["result"] = "ok"
        except OSError as e:
            obs["result"] = _errname(e)
        if watch:
            obs["injected"] = _bits(
                _wait_for(lambda: vm_a.pic_irr() | vm_a.ioapic_requests(), self.quiet)
            )
            vm_a.relatch(latched)
        if vm_a.irqchip and not vm_a.closed:
            levels = _bits(vm_a.pic_levels() & ((1 << LEVEL_GSIS) - 1))
            if levels:
                obs["asserted"] = levels
        obs["counters"] = {n: K.eventfd_count(fd) for n, fd in sorted(self.fds.items())}
        return obs

    def _access(self, vm: K.Vm, write: bool, a: dict[str, Any]) -> list[K.Exit]:
        """One guest access: real mode up to 4 GiB, long mode (:mod:`hostemu.kvm_long`)
        for MMIO that reaches above."""
        addr, width, value = a["addr"], a["len"], a.get("value", 0)
        if a["pio"] or addr + width <= 1 << 32:
            code, data = R.program(pio=a["pio"], write=write, addr=addr, width=width, value=value)
            return vm.vcpu().run_program(code, data)
        if self._phys_bits is None:
            self._phys_bits = L.phys_bits(self.kvm)
        if addr + width > 1 << self._phys_bits:
            raise RuntimeError(
                f"MMIO at {addr:#x}/{width} is beyond this machine's guest-physical address "
                f"width ({self._phys_bits} bits): no guest access can reach it here"
            )
        return L.run(vm.vcpu(), L.program(write=write, addr=addr, width=width, value=value))

    def _flush_irqfd_cleanup(self) -> None:
        """Let KVM finish the irqfd detaches a close started.

        The last close of an eventfd detaches its irqfds from a kernel workqueue: for a
        moment afterwards a signal from another holder (an ioeventfd) may still inject.
        An irqfd deassign flushes that queue before it returns, so a deassign of a pair
        never assigned (always accepted) on each VM waits the detach out. vbusemu's
        detach is synchronous, so without this a busy machine would show the window as
        a difference."""
        probe = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            for vm in self.vms.values():
                if not vm.closed:
                    with contextlib.suppress(OSError):
                        vm.irqfd(probe, 0, K.KVM_IRQFD_FLAG_DEASSIGN)
        finally:
            os.close(probe)

    def _vm_fd(self, name: str) -> None:
        if self._vm(name).closed:
            raise OSError(errno.EBADF, "the VM's descriptor is closed")


class BrokerBackend:
    """One scenario on a broker (already running at ``socket``), with a guest process."""

    name = "vbusemu"

    def __init__(
        self, socket: str, scenario: Scenario, logdir: Path, quiet: float = INJECT_QUIET
    ) -> None:
        self.socket = socket
        self.scenario = scenario
        self.logdir = logdir
        self.quiet = quiet  # how long a step that raises nothing is watched
        self._stack = contextlib.ExitStack()
        self.vms: dict[str, int] = {}
        self.handles: dict[str, int] = {}
        self.copies: dict[str, Any] = {}  # name -> OwnedFd: the VMM's copy, for counters
        self.other: dict[str, int] = {}
        self.gone: set[str] = set()  # VMs torn down (their ids now answer ENOENT)
        self.guest: Any = None

    def __enter__(self) -> BrokerBackend:
        from hostemu.launcher import spawn_guest
        from shared.channel import Channel
        from shared.wire import Scope

        try:
            self.ch = self._stack.enter_context(Channel.connect(self.socket))
            self.vms["a"] = self.ch.vm_create(32, irqchip=self.scenario.irqchip)
            log = self._stack.enter_context(open(self.logdir / "guest.log", "a"))
            self.guest = spawn_guest(
                self.ch.channel_open(Scope.VM, self.vms["a"]), "conform-guest", stderr=log
            )
            self._stack.callback(self.guest.stop)
            self.guest.wait_event("attached")
            self.guest.call("hold_interrupts", hold=True)  # like the oracle's guest
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.copies.values():
            fd.close()
        self.copies.clear()
        # Closing the channel is a leave: the broker destroys our VMs (the guest sees
        # them go and exits), drops our handles; then the guest is stopped.
        self._stack.close()

    def _handle(self, name: str | None) -> int:
        from shared import wire

        if name is None:
            return wire.NO_HANDLE
        return self.handles.get(name, self.other.get(name, BAD_HANDLE))

    def _vm(self, name: str) -> int:
        return self.vms[name]

    def _guest_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.guest.call("stats", settle=True)
        return stats

    def _sync_guest(self) -> None:
        """Wait until the guest holds what the broker bound for VM ``a``."""
        vm = self.vms["a"]
        if "a" in self.gone or not self.guest.alive:
            return
        deadline = time.monotonic() + 5.0
        while True:
            state = self.ch.state()
            want_irq = sorted(
                b["gsi"]
                for b in state["bindings"]
                if b["kind"] == "irqfd" and b.get("vm") == vm and b["state"] == "active"
            )
            want_io = sum(
                1
                for b in state["bindings"]
                if b["kind"] == "ioeventfd"
                and b.get("vm") == vm
                and b["state"] == "active"
                and b["bus"] != "ccw"  # a bus the guest never reaches: it is not told
            )
            stats = self._guest_stats()
            if stats["irqfds"] == want_irq and stats["ioeventfds"] == want_io:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the guest did not catch up: has {stats['irqfds']}, "
                    f"{stats['ioeventfds']}; broker {want_irq}, {want_io}"
                )
            time.sleep(0.005)

    def _wakeups(self) -> dict[int, int]:
        if "a" in self.gone or not self.guest.alive:
            return {}
        return {int(k): v for k, v in self._guest_stats()["wakeups"].items()}

    def step(self, step: Step) -> Observation:
        from shared import wire
        from shared.fds import OwnedFd

        a = step.args
        obs: Observation = {}
        watch = step.op in MAY_INJECT and self.scenario.irqchip and "a" not in self.gone
        if watch or step.op in GUEST_STEPS:
            self._sync_guest()
        before = self._wakeups() if watch else {}
        try:
            if step.op == "eventfd":
                h = self.ch.eventfd_create(initval=a["initval"], semaphore=bool(a.get("semaphore")))
                self.handles[a["name"]] = h
                self.copies[a["name"]] = self.ch.handle_fd(h)
            elif step.op == "memfd":
                fd = os.memfd_create("conform", os.MFD_CLOEXEC)
                with OwnedFd(fd) as owned:
                    os.ftruncate(fd, 4096)
                    self.other[a["name"]] = self.ch.memory_import(owned, 4096)
            elif step.op == "vm":
                self.vms[a["name"]] = self.ch.vm_create(32, irqchip=a["irqchip"])
            elif step.op in ("irqfd", "irqfd_deassign"):
                flags = a["flags"]
                if step.op == "irqfd_deassign":
                    flags |= wire.IRQFD_FLAG_DEASSIGN
                elif a["resample"] is not None:
                    flags |= wire.IRQFD_FLAG_RESAMPLE
                self.ch.request(
                    wire.Irqfd(
                        vm=self._vm(a["vm"]),
                        handle=self._handle(a["efd"]),
                        gsi=a["gsi"],
                        flags=flags,
                        resample_handle=self._handle(a.get("resample")),
                    )
                )
            elif step.op in ("ioeventfd", "ioeventfd_deassign"):
                flags = a["flags"]
                if a["datamatch"] is not None:
                    flags |= wire.IOEVENTFD_FLAG_DATAMATCH
                if a["pio"]:
                    flags |= wire.IOEVENTFD_FLAG_PIO
                if step.op == "ioeventfd_deassign":
                    flags |= wire.IOEVENTFD_FLAG_DEASSIGN
                self.ch.request(
                    wire.Ioeventfd(
                        vm=self._vm(a["vm"]),
                        handle=self._handle(a["efd"]),
                        flags=flags,
                        len=a["len"],
                        addr=a["addr"],
                        datamatch=a["datamatch"] or 0,
                    )
                )
            elif step.op in ACCESSES:
                value = a.get("value", 0) & MASK[a["len"]]
                write = step.op == "write"
                hit = (
                    write
                    and self.guest.call(
                        "io_write", pio=a["pio"], addr=a["addr"], len=a["len"], value=value
                    )["hit"]
                )
                exit_ = K.Exit(a["pio"], write, a["addr"], a["len"], value if write else 0)
                obs["exit"] = "absorbed" if hit else [exit_.describe()]
            elif step.op == "signal":
                os.eventfd_write(self.copies[a["efd"]].fileno(), a["n"])
            elif step.op == "take":
                if "a" in self.gone:
                    raise ValueError("a take step needs VM a's guest: the VM is gone")
                took = self.guest.call("take_interrupts")["took"]
                obs["took"] = [gsi for gsi in took if gsi < OBSERVED_GSIS]
            elif step.op == "close":
                self.copies.pop(a["efd"]).close()
                self.ch.handle_close(self.handles.pop(a["efd"]))
            elif step.op == "teardown":
                self.ch.vm_destroy(self._vm(a["vm"]))
                self.gone.add(a["vm"])
            else:
                raise ValueError(f"unknown step {step.op!r}")
            obs["result"] = "ok"
        except BrokerError as e:
            obs["result"] = _errname(e)
        if watch:

            def raised() -> int:
                after = self._wakeups()
                mask = 0
                for gsi, n in after.items():
                    if gsi < OBSERVED_GSIS and n > before.get(gsi, 0):
                        mask |= 1 << gsi
                return mask

            obs["injected"] = _bits(_wait_for(raised, self.quiet))
        if self.scenario.irqchip and "a" not in self.gone and self.guest.alive:
            levels = [gsi for gsi in self._guest_stats()["level"] if gsi < LEVEL_GSIS]
            if levels:
                obs["asserted"] = levels
        obs["counters"] = {n: K.eventfd_count(fd.fileno()) for n, fd in sorted(self.copies.items())}
        return obs
