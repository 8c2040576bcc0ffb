"""The VMM: creates VMs, their RAM and devices, and wires the signaling the 2009 way.

Theory of operation
-------------------
For each VM the VMM creates, through the broker: the VM (with an interrupt controller),
its RAM (a :class:`~shared.memory.SharedRegion`, imported and registered as memory slot
0 at guest-physical 0), and one vbus device per device model. It publishes each device to
the guest as a PCI-like function (:class:`~hostemu.pci.PciFunction` on a
:class:`~hostemu.pci.PciBus`) and starts the device processes, then the guest process,
each on its own scoped channel.

The guest's driver reaches the VMM only through I/O exits (config space, BAR registers,
any notify write no ioeventfd caught). The VMM applies each to the bus model and turns the
resulting events into broker calls -- the hooks the seed describes:

* **BAR programmed / moved** -> for each queue, ``IOEVENTFD`` deassign at the old notify
  address and assign at the new one (``len 4, datamatch = queue``), always with the
  queue's one doorbell eventfd, which the device process consumes as its kickfd; a BAR
  move therefore never loses or duplicates a kick.
* **MSI vector programmed** -> ``fd = eventfd()``; ``IRQFD_ASSIGN {fd, gsi}``;
  ``SHMSIGNAL_ASSIGN {device, sigid = vector, fd}``; then ``close(fd)`` under the
  ``refcount`` policy -- exactly the seed. Under ``hup`` closing would HUP both bindings,
  so the VMM keeps the handle, as qemu does on Linux. Reprogramming deassigns the old pair
  (both deassigns return only after the old consumer and producer acknowledged) and the
  old eventfd is released.
* **Queue enabled / disabled, device reset** -> a ``DeviceConfig`` relayed to the device
  process (like vhost-user SET_VRING_ADDR); replayed when a device process re-attaches.

Only after the events are applied does the VMM complete the exit, so when the guest's
register write returns, the binding it implied is in place.

Exits are served fairly across VMs: the broker lets each vCPU have one exit in flight, and
:meth:`Vmm.process_notices` serves at most one exit per VM per turn, round-robin, and
only what had arrived when the turn began. A guest that exits back to back therefore
delays another VM's exit by at most one of its own, and never keeps the VMM from its
other work (guest and device output, restarts) between turns.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import select
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hostemu.launcher import ManagedProcess, spawn_agent
from hostemu.pci import (
    BarMoved,
    DeviceReset,
    Event,
    MsiProgrammed,
    PciBus,
    PciFunction,
    QueueDisabled,
    QueueEnabled,
    QueueNotifyExit,
)
from shared import pci_layout as pl
from shared import wire
from shared.channel import Channel
from shared.errors import BrokerError, ConfigError, PeerGoneError, VbusError
from shared.fds import EventNotifier
from shared.loop import EXIT_BROKER_GONE, EventLoop, setup_logging, silence_stdout
from shared.memory import SharedRegion
from shared.wire import Policy, Scope

log = logging.getLogger("vbusemu.vmm")

F_EVENT_IDX = 1
INTERNAL_EVENTS = frozenset(
    {
        "attached",
        "irqfd_attached",
        "ioeventfd_attached",
        "detached",
        "peer_gone",
        "shmsignal_attached",
    }
)


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a VM. Its shape (PCI device id, queues, vectors) and its config-space
    bytes come from the model's module (:func:`model_shape`); ``params`` are the model's
    options, passed to the device process as ``--params JSON``."""

    model: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    queue_size_max: int = 256
    restarts: int = 0
    """How many times the VMM restarts this device's process if it dies while its guest
    runs (the new process re-attaches and resumes the queues from the used indices)."""
    cpus: tuple[int, ...] = ()
    """CPUs the device process may run on (``sched_setaffinity``); empty: any."""


@dataclass(frozen=True)
class ModelShape:
    device_id: int
    queues: int
    vectors: int
    config: bytes


def model_shape(spec: DeviceSpec) -> ModelShape:
    """What the VMM publishes for a model: ``DEVICE_ID``, ``QUEUES``, ``VECTORS`` and
    ``device_config(params) -> bytes`` of module ``hostemu.devices.<model>``."""
    import importlib

    try:
        module = importlib.import_module(f"hostemu.devices.{spec.model}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"device {spec.name}: unknown model {spec.model!r}") from e
    make_config = getattr(module, "device_config", None)
    config = make_config(spec.params) if make_config is not None else b""
    return ModelShape(int(module.DEVICE_ID), int(module.QUEUES), int(module.VECTORS), config)


@dataclass(frozen=True)
class VmSpec:
    name: str
    memory: int = 16 << 20
    ngsi: int = 32
    devices: tuple[DeviceSpec, ...] = ()
    workload: tuple[str, ...] = ()
    memory_sealed: bool = True
    """Guest RAM as a size-sealed memfd (default: no peer can truncate it under the others,
    see :mod:`shared.memory`), or ``False``: a POSIX shm object (posix_ipc), unsealable."""
    device_grace: float = 10.0
    """With restartable devices: how long the guest's vCPU waits for one to come back."""
    guest_restarts: int = 0
    """How many times the VMM restarts the guest process if it dies before reporting its
    workload's result (the new guest re-attaches, boots and resets its devices)."""
    cpus: tuple[int, ...] = ()
    """CPUs the guest process (its vCPU) may run on (``sched_setaffinity``); empty: any.
    Pinning the guest and its devices to one CPU or to different ones chooses what a
    wakeup costs (a context switch, or a cross-CPU wakeup), as ``taskset`` would."""


def check_cpus(cpus: tuple[int, ...], what: str) -> None:
    """``ConfigError`` unless ``cpus`` is empty or a set of CPUs this process may use."""
    usable = os.sched_getaffinity(0)
    if cpus and not set(cpus) <= usable:
        raise ConfigError(
            f"{what}: cpus {list(cpus)} are not all usable here (usable: {sorted(usable)})"
        )


def pin(proc: ManagedProcess, cpus: tuple[int, ...]) -> None:
    """Restrict a process we started to ``cpus`` (no-op when empty)."""
    if cpus:
        with contextlib.suppress(ProcessLookupError):  # already gone: its exit is handled
            os.sched_setaffinity(proc.pid, cpus)


@dataclass(frozen=True)
class SwitchSpec:
    """A device process serving several VMs' devices (``ports``: ``"vm/device"``)."""

    name: str
    ports: tuple[str, ...]
    model: str = "venet"


@dataclass(eq=False)
class VmmDevice:
    spec: DeviceSpec
    shape: ModelShape
    id: int
    function: PciFunction
    doorbells: dict[int, int] = field(default_factory=dict)  # queue -> eventfd handle
    kick_writers: dict[int, EventNotifier] = field(default_factory=dict)
    vectors: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # v -> (gsi, h)
    process: ManagedProcess | None = None
    vm_name: str = ""
    restarted: int = 0
    # Restart bookkeeping for the current process: it is restarted once its output reached
    # EOF (exited) and either the broker let go of it (gone) or it never attached at all
    # (killed before its Attach: the broker will never send a PeerGone for it).
    attached: bool = False
    gone: bool = False
    exited: bool = False


@dataclass(eq=False)
class VmmVm:
    spec: VmSpec
    id: int
    bus: PciBus
    devices: dict[int, VmmDevice] = field(default_factory=dict)  # by PCI slot
    guest: ManagedProcess | None = None
    exits: int = 0
    guest_restarted: int = 0
    # as VmmDevice's, for the guest process (exited: EOF without a result)
    guest_attached: bool = False
    guest_gone: bool = False
    guest_exited: bool = False


class Vmm:
    """Owns the VMs it creates and the processes it starts for them."""

    def __init__(
        self, channel: Channel, *, stderr: Any = None, start_together: bool = False
    ) -> None:
        self.channel = channel
        # guests start with --start-gate and are released together (run_until_guests_exit)
        self.start_together = start_together
        self.policy = Policy(channel.hello().policy)
        self.stderr = stderr
        self.vms: dict[int, VmmVm] = {}
        self.reports: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.switch_procs: list[ManagedProcess] = []
        # I/O exits waiting for their VM's next turn (see process_notices), by VM id
        self._exits: dict[int, deque[wire.IoExitNotice]] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        """What guests and devices report, and restarts: one JSON line on stdout (what
        ``vbusemu run`` reads). An embedding driver (the soak runner) overrides it."""
        print(json.dumps(event), flush=True)

    # ------------------------------------------------------------------ building

    def create_vm(self, spec: VmSpec) -> VmmVm:
        ch = self.channel
        check_cpus(spec.cpus, f"vm {spec.name}")
        for dspec in spec.devices:
            check_cpus(dspec.cpus, f"device {spec.name}/{dspec.name}")
        vm_id = ch.vm_create(spec.ngsi)
        with SharedRegion.create(spec.memory, sealed=spec.memory_sealed) as ram:
            handle = ch.memory_import(ram.fd, spec.memory)
            ch.memslot_set(vm_id, 0, 0, spec.memory, handle)
            ch.handle_close(handle)  # the slot holds the memory; the VMM needs no handle
        vm = VmmVm(spec, vm_id, PciBus())
        for slot, dspec in enumerate(spec.devices):
            shape = model_shape(dspec)
            dev_id = ch.device_create(vm_id, nsignals=max(1, shape.vectors))
            fn = PciFunction(
                slot,
                shape.device_id,
                num_queues=shape.queues,
                num_vectors=shape.vectors,
                queue_size_max=dspec.queue_size_max,
                features=F_EVENT_IDX,
                device_config=shape.config,
            )
            vm.bus.add(fn)
            dev = vm.devices[slot] = VmmDevice(dspec, shape, dev_id, fn, vm_name=spec.name)
            for q in range(shape.queues):
                # One doorbell eventfd per queue for the device's life: bound as the queue's
                # kickfd now, and as an ioeventfd wherever the guest puts the BAR.
                h = dev.doorbells[q] = ch.eventfd_create()
                ch.call(wire.DeviceKickfd(device=dev_id, queue=q, handle=h), wire.IdReply)
                dev.kick_writers[q] = EventNotifier(ch.handle_fd(h))
        self.vms[vm_id] = vm
        return vm

    def start(
        self, switches: list[SwitchSpec] | tuple[SwitchSpec, ...] = (), timeout: float = 20.0
    ) -> None:
        """Start every device process (one per switch for switch ports), wait until all
        attached, then start the guests. Processes started before are left alone, so VMs
        created later are started by calling this again."""
        waiting: list[tuple[ManagedProcess, int]] = []
        in_switch: set[tuple[str, str]] = set()
        for sw in switches:
            devs = [self.device_named(port) for port in sw.ports]
            proc = spawn_agent(
                "hostemu.devices",
                [self.channel.channel_open(Scope.DEVICE, d.id) for _, d in devs],
                f"switch/{sw.name}",
                sw.model,
                "--params",
                json.dumps({"ports": list(range(len(devs)))}),
                stderr=self.stderr,
            )
            self.switch_procs.append(proc)
            for _, d in devs:
                d.process = proc
            waiting.append((proc, len(devs)))
            in_switch.update(tuple(p.split("/", 1)) for p in sw.ports)  # type: ignore[misc]
        for vm in self.vms.values():
            for dev in vm.devices.values():
                if (vm.spec.name, dev.spec.name) in in_switch or dev.process is not None:
                    continue
                waiting.append((self._spawn_device(dev), 1))
        for proc, count in waiting:
            for _ in range(count):
                proc.wait_event("attached", timeout)
        for vm in self.vms.values():
            if vm.guest is None:
                self._spawn_guest(vm)

    def _spawn_guest(self, vm: VmmVm) -> ManagedProcess:
        grace = (
            ["--device-grace", str(vm.spec.device_grace)]
            if any(d.spec.restarts for d in vm.devices.values())
            else []
        )
        vm.guest = spawn_agent(
            "guestemu.guest",
            self.channel.channel_open(Scope.VM, vm.id),
            vm.spec.name,
            *vm.spec.workload,
            *grace,
            *(["--start-gate"] if self.start_together else []),
            stderr=self.stderr,
        )
        pin(vm.guest, vm.spec.cpus)
        return vm.guest

    def restart_guest_if_due(self, vm: VmmVm) -> bool:
        """Restart ``vm``'s guest if it died without a result, the broker let go of it and
        restarts are left. The new guest boots from scratch: it reprograms BARs and MSI
        vectors (the VMM rebinds) and resets its devices before using them."""
        old = vm.guest
        if (
            not (vm.guest_exited and (vm.guest_gone or not vm.guest_attached))
            or old is None
            or vm.guest_restarted >= vm.spec.guest_restarts
        ):
            return False
        status = old.stop()
        vm.guest_restarted += 1
        vm.guest_gone = vm.guest_exited = vm.guest_attached = False
        new = self._spawn_guest(vm)
        log.warning(
            "guest %s (pid %d) exited with status %s: restarted as pid %d (%d of %d)",
            vm.spec.name,
            old.pid,
            status,
            new.pid,
            vm.guest_restarted,
            vm.spec.guest_restarts,
        )
        self.on_event(
            {
                "event": "guest_restarted",
                "vm": vm.spec.name,
                "old_pid": old.pid,
                "pid": new.pid,
                "status": status,
                "restart": vm.guest_restarted,
            }
        )
        return True

    def _spawn_device(self, dev: VmmDevice) -> ManagedProcess:
        dev.process = spawn_agent(
            "hostemu.devices",
            self.channel.channel_open(Scope.DEVICE, dev.id),
            f"{dev.vm_name}/{dev.spec.name}",
            dev.spec.model,
            "--params",
            json.dumps(dev.spec.params),
            stderr=self.stderr,
        )
        pin(dev.process, dev.spec.cpus)
        return dev.process

    def restart_if_due(self, dev: VmmDevice) -> bool:
        """Restart ``dev``'s process if it died, the broker has let go of it (so the new
        one can attach) and restarts are left. The new process attaches; the broker
        resends memory and eventfds; :meth:`_replay_queues` resumes its queues."""
        proc = dev.process
        if (
            not (dev.exited and (dev.gone or not dev.attached))
            or proc is None
            or proc in self.switch_procs
            or dev.restarted >= dev.spec.restarts
        ):
            return False
        status = proc.stop()  # reaps it (it closed its output: it is exiting or gone)
        dev.restarted += 1
        dev.gone = dev.exited = dev.attached = False
        new = self._spawn_device(dev)
        log.warning(
            "device %s/%s (pid %d) exited with status %s: restarted as pid %d (%d of %d)",
            dev.vm_name,
            dev.spec.name,
            proc.pid,
            status,
            new.pid,
            dev.restarted,
            dev.spec.restarts,
        )
        self.on_event(
            {
                "event": "device_restarted",
                "vm": dev.vm_name,
                "device": dev.spec.name,
                "old_pid": proc.pid,
                "pid": new.pid,
                "status": status,
                "restart": dev.restarted,
            }
        )
        return True

    def device_named(self, path: str) -> tuple[VmmVm, VmmDevice]:
        """``"vm/device"`` -> the VM and the device."""
        vm_name, _, dev_name = path.partition("/")
        for vm in self.vms.values():
            if vm.spec.name == vm_name:
                for dev in vm.devices.values():
                    if dev.spec.name == dev_name:
                        return vm, dev
        raise ConfigError(f"no device {path!r}")

    # ------------------------------------------------------------------ exits

    def process_notices(self) -> None:
        """One turn of service: handle every notice that has arrived, serving at most one
        I/O exit per VM. A VM's other exits wait, in order, for the next turns; exits of
        VMs that waited come first. Whatever arrives during the turn (a storming guest's
        next exit, sent as soon as the last one was answered) waits for the next turn, so
        a turn is bounded and the run loop gets back to its other fds in between.

        Other notices are handled in arrival order, in the turn they arrive; an exit held
        back for a later turn does not hold them up."""
        self.channel.pump()
        arrived = deque(self.channel.notices)
        self.channel.notices.clear()
        served: set[int] = set()
        try:
            for vm_id in list(self._exits):
                waiting = self._exits[vm_id]
                ex = waiting.popleft()
                if not waiting:
                    del self._exits[vm_id]
                served.add(vm_id)
                self.on_exit(ex)
            while arrived:
                msg = arrived.popleft()
                if isinstance(msg, wire.IoExitNotice):
                    if msg.vm in served or msg.vm in self._exits:
                        self._exits.setdefault(msg.vm, deque()).append(msg)  # carries no fds
                        continue
                    served.add(msg.vm)
                try:
                    self.on_notice(msg)
                finally:
                    msg.close_fds()
        finally:
            # Not handled (something raised): back in order, for the next turn (or for the
            # channel's close, which closes their fds).
            self.channel.notices.extendleft(reversed(arrived))

    @property
    def has_work(self) -> bool:
        """Notices or exits wait for the next turn of :meth:`process_notices`."""
        return bool(self.channel.notices or self._exits)

    def on_notice(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.IoExitNotice):
            self.on_exit(msg)
        elif isinstance(msg, wire.DeviceReportNotice):
            report = {"device": msg.device, **json.loads(msg.text)}
            self.reports.append(report)
            self._mark_broken(msg.device, report)
        elif isinstance(msg, wire.PeerAttached) and msg.kind == wire.PeerKind.DEVICE:
            for dev in self.all_devices():
                if dev.id == msg.id:
                    dev.attached = True
            self._replay_queues(msg.id)
        elif isinstance(msg, wire.PeerAttached) and msg.kind == wire.PeerKind.GUEST:
            if msg.id in self.vms:
                self.vms[msg.id].guest_attached = True
        elif isinstance(msg, wire.PeerGone):
            self.reports.append(
                {"event": "peer_gone", "kind": wire.PeerKind(msg.kind).name.lower(), "id": msg.id}
            )
            if msg.kind == wire.PeerKind.DEVICE:
                for dev in self.all_devices():
                    if dev.id == msg.id:
                        dev.gone = True
                        self.restart_if_due(dev)
            elif msg.kind == wire.PeerKind.GUEST and msg.id in self.vms:
                self.vms[msg.id].guest_gone = True
                self.restart_guest_if_due(self.vms[msg.id])

    def all_devices(self) -> list[VmmDevice]:
        return [dev for vm in self.vms.values() for dev in vm.devices.values()]

    def on_exit(self, ex: wire.IoExitNotice) -> None:
        vm = self.vms.get(ex.vm)
        value, errno = 0, 0
        if vm is None or ex.pio:
            value = (1 << (8 * ex.len)) - 1  # nothing decodes it: all ones
        elif ex.write:
            vm.exits += 1
            for event in vm.bus.mmio_write(ex.addr, ex.len, ex.value):
                self.apply(vm, event)
        else:
            vm.exits += 1
            value = vm.bus.mmio_read(ex.addr, ex.len)
        try:
            self.channel.call(wire.IoExitDone(token=ex.token, value=value, errno=errno), wire.Ok)
        except BrokerError as e:  # the VM went away meanwhile; nobody waits for the answer
            log.info("I/O exit %d not completed: %s", ex.token, e)

    def apply(self, vm: VmmVm, event: Event) -> None:
        """Turn one bus event into broker calls; a refusal is recorded, never fatal."""
        dev = vm.devices.get(event.function)
        if dev is None:
            return
        try:
            if isinstance(event, BarMoved):
                self._move_doorbells(vm, dev, event.old, event.new)
            elif isinstance(event, MsiProgrammed):
                self._program_vector(vm, dev, event.vector, event.new_gsi)
            elif isinstance(event, QueueEnabled):
                self._configure(dev, self._queue_config(event))
            elif isinstance(event, QueueDisabled):
                self._configure(dev, {"op": "disable", "queue": event.queue})
            elif isinstance(event, DeviceReset):
                self._configure(dev, {"op": "reset"})
            elif isinstance(event, QueueNotifyExit):
                dev.kick_writers[event.queue].notify(1)
        except BrokerError as e:
            self.errors.append(f"{vm.spec.name}/{dev.spec.name}: {type(event).__name__}: {e}")
            log.warning("%s", self.errors[-1])

    def _move_doorbells(self, vm: VmmVm, dev: VmmDevice, old: int | None, new: int | None) -> None:
        for q, handle in dev.doorbells.items():
            if old is not None:
                self.channel.ioeventfd(
                    vm.id,
                    handle,
                    old + pl.notify_offset(q),
                    pl.NOTIFY_SIZE,
                    datamatch=q,
                    deassign=True,
                )
            if new is not None:
                self.channel.ioeventfd(
                    vm.id, handle, new + pl.notify_offset(q), pl.NOTIFY_SIZE, datamatch=q
                )

    def _program_vector(self, vm: VmmVm, dev: VmmDevice, vector: int, gsi: int | None) -> None:
        ch = self.channel
        if vector in dev.vectors:
            old_gsi, old_handle = dev.vectors.pop(vector)
            ch.shmsignal_deassign(dev.id, vector, old_handle)
            ch.irqfd_deassign(vm.id, old_handle, old_gsi)
            if old_handle is not None:
                ch.handle_close(old_handle)  # the old eventfd is released
        if gsi is None:
            return
        handle = ch.eventfd_create()  # fd = eventfd(0, 0)
        try:
            ch.irqfd_assign(vm.id, handle, gsi)  # KVM_IRQFD_ASSIGN {fd, gsi}
            ch.shmsignal_assign(dev.id, vector, handle)  # VBUS_SHMSIGNAL_ASSIGN {sigid, fd}
        except BrokerError:
            ch.irqfd_deassign(vm.id, handle, gsi)
            ch.handle_close(handle)
            raise
        if self.policy is Policy.REFCOUNT:
            ch.handle_close(handle)  # close(fd): the bindings keep it alive
            dev.vectors[vector] = (gsi, None)
        else:
            dev.vectors[vector] = (gsi, handle)  # under hup, close would HUP both sides

    @staticmethod
    def _queue_config(ev: QueueEnabled) -> dict[str, Any]:
        return {
            "op": "queue",
            "queue": ev.queue,
            "size": ev.size,
            "desc": ev.desc,
            "avail": ev.avail,
            "used": ev.used,
            "vector": -1 if ev.vector is None else ev.vector,
            "event_idx": ev.event_idx,
        }

    def _configure(self, dev: VmmDevice, cfg: dict[str, Any]) -> None:
        try:
            self.channel.call(wire.DeviceConfig(device=dev.id, text=json.dumps(cfg)), wire.Ok)
        except BrokerError as e:
            if e.name in ("ENOTCONN", "EPIPE") and dev.restarted < dev.spec.restarts:
                # The device process is down (or died before answering) and will be
                # restarted: the function model keeps the queue state, and the new process
                # gets it replayed when it attaches (a reset needs nothing: it starts clean).
                log.info(
                    "%s/%s: %s deferred until the device is back: %s",
                    dev.vm_name,
                    dev.spec.name,
                    cfg.get("op"),
                    e,
                )
                return
            if cfg.get("op") == "queue":
                dev.function.set_queue_broken(int(cfg["queue"]), str(e))
            raise

    def _replay_queues(self, device_id: int) -> None:
        """A (re)started device process gets the queues the driver already enabled."""
        for vm in self.vms.values():
            for dev in vm.devices.values():
                if dev.id != device_id:
                    continue
                for q in range(dev.shape.queues):
                    cfg = dev.function.queue_config(q)
                    if cfg is not None:
                        try:
                            self._configure(dev, {**self._queue_config(cfg), "resume": True})
                        except BrokerError as e:
                            self.errors.append(
                                f"{vm.spec.name}/{dev.spec.name}: resuming queue {q}: {e}"
                            )

    def _mark_broken(self, device_id: int, report: dict[str, Any]) -> None:
        for vm in self.vms.values():
            for dev in vm.devices.values():
                if dev.id == device_id and "queue" in report:
                    dev.function.set_queue_broken(int(report["queue"]), str(report.get("reason")))

    # ------------------------------------------------------------------ running

    def run_until_guests_exit(self, loop: EventLoop, timeout: float) -> dict[str, Any]:
        """Serve exits until every guest process has exited; collect their results."""
        results: dict[str, Any] = {}
        pending: dict[int, tuple[VmmVm, ManagedProcess]] = {}
        guests_seen: list[ManagedProcess] = []
        # start_together: guests waiting at their start gate; once every running guest is
        # there (or has exited), all get "go" -- and so does any that arrives later
        at_gate: list[ManagedProcess] = []
        released = [False]

        def release_gate() -> None:
            if not released[0] and all(any(g is p for p in at_gate) for _, g in pending.values()):
                released[0] = True
            if released[0]:
                for g in at_gate:
                    if g.alive:
                        with contextlib.suppress(OSError):
                            g.send("go")
                at_gate.clear()

        def watch_guests() -> None:
            for vm in self.vms.values():
                g = vm.guest
                if g is not None and not any(g is q for q in guests_seen):
                    guests_seen.append(g)
                    pending[g.stdout_fd()] = (vm, g)
                    loop.watch(g.stdout_fd(), functools.partial(guest_output, g.stdout_fd()))

        def guest_output(fd: int) -> None:
            vm, guest = pending[fd]
            lines = guest.poll_lines()
            for obj in lines or []:
                event = obj.get("event")
                if event == "workload_done":
                    results[vm.spec.name] = obj
                elif event == "start_gate":
                    at_gate.append(guest)
                    release_gate()
                elif event not in INTERNAL_EVENTS and event is not None:
                    # progress the guest reports (console text, milestones) goes upstream
                    self.on_event(
                        {
                            **obj,
                            "event": "guest_event",
                            "name": event,
                            "vm": vm.spec.name,
                            "guest_pid": guest.pid,
                        }
                    )
            if lines is None:
                loop.unwatch(fd)
                del pending[fd]
                if at_gate and not released[0]:
                    release_gate()  # the others may have been waiting for this one only
                if vm.spec.name not in results and vm.guest_restarted < vm.spec.guest_restarts:
                    vm.guest_exited = True
                    self.channel.pump()  # its PeerAttached / PeerGone may be waiting
                    self.process_notices()
                    self.restart_guest_if_due(vm)  # or once the broker's PeerGone arrives

        def restarting() -> bool:
            return any(vm.guest_exited for vm in self.vms.values())

        devices: dict[int, tuple[ManagedProcess, str]] = {}

        seen: list[ManagedProcess] = []  # every device process watched so far (kept alive)

        def watch_devices() -> None:
            """Watch the output of every device process not watched before (restarted
            ones included). Never twice: one that reached EOF may not be reaped yet."""
            for vm in self.vms.values():
                for dev in vm.devices.values():
                    p = dev.process
                    # Dead ones too: a process killed right after it was (re)started
                    # still gives EOF, and that EOF is what lets it be restarted.
                    if p is not None and not p.stdout_closed and not any(p is q for q in seen):
                        seen.append(p)
                        fd = p.stdout_fd()
                        devices[fd] = (p, vm.spec.name)
                        loop.watch(fd, functools.partial(device_output, fd))

        def forward(proc: ManagedProcess, vm_name: str) -> list[dict[str, Any]] | None:
            lines = proc.poll_lines()
            for obj in lines or []:
                event = obj.get("event")
                if event not in INTERNAL_EVENTS and event is not None:
                    self.on_event(
                        {
                            **obj,
                            "event": "guest_event",
                            "name": event,
                            "vm": vm_name,
                            "device": proc.name,
                        }
                    )
            # poll_lines also keeps every event; a chatty console must not grow that list
            proc.events[:] = [e for e in proc.events if e.get("event") in INTERNAL_EVENTS]
            return lines

        def device_output(fd: int) -> None:
            proc, vm_name = devices[fd]
            lines = forward(proc, vm_name)
            if lines is None:  # supervision: a device process died under its guest
                loop.unwatch(fd)
                del devices[fd]
                dev = next((d for d in self.all_devices() if d.process is proc), None)
                if dev is not None and dev.restarted < dev.spec.restarts:
                    dev.exited = True
                    self.channel.pump()  # its PeerAttached / PeerGone may be waiting
                    self.process_notices()
                    self.restart_if_due(dev)  # or once the broker's PeerGone arrives
                elif pending:
                    self.errors.append(
                        f"device process {proc.name} (pid {proc.pid}) exited "
                        f"with status {proc.proc.wait(5)} while guests ran"
                    )

        loop.watch(self.channel.fileno(), lambda: None)
        watch_guests()
        watch_devices()
        deadline = time.monotonic() + timeout
        while (pending or restarting()) and not loop.stopping and time.monotonic() < deadline:
            self.channel.pump()
            self.process_notices()
            wait = 0.0 if self.has_work else min(0.5, max(0.0, deadline - time.monotonic()))
            loop.poll_once(wait)
            self.channel.pump()
            self.process_notices()
            watch_guests()
            watch_devices()
        loop.unwatch(self.channel.fileno())
        for fd in [*pending, *devices]:
            loop.unwatch(fd)
        # A device writes an event (a console line) before it returns the guest's buffer,
        # so what a guest printed before it exited is in the pipe now: forward it, or the
        # stats call would swallow it. Bounded: after a timeout a guest may still be talking.
        for proc, vm_name in devices.values():
            for _ in range(64):  # poll_lines reads at most 64 KiB per call
                if not forward(proc, vm_name):
                    break
        if pending:
            self.errors.append(
                f"guests still running after {timeout}s: "
                f"{[v.spec.name for v, _ in pending.values()]}"
            )
        return results

    def stats(self) -> dict[str, Any]:
        """Per VM: exits served and each device's counters (asked of its process)."""
        out: dict[str, Any] = {}
        asked: dict[int, dict[str, Any]] = {}
        for vm in self.vms.values():
            devs = {}
            for dev in vm.devices.values():
                p = dev.process
                if p is None or not p.alive:
                    continue
                if p.pid not in asked:
                    try:
                        asked[p.pid] = p.call("stats", timeout=5)
                    except VbusError as e:
                        asked[p.pid] = {"error": str(e)}
                reply = asked[p.pid]
                if "ports" in reply:  # a switch: this device's own port
                    reply = reply["ports"][int(dev.spec.params.get("port", 0))]
                devs[dev.spec.name] = reply
            out[vm.spec.name] = {"exits": vm.exits, "devices": devs}
        return out

    def shutdown(self) -> None:
        """Destroy every VM (the guest and device processes get peer-gone and exit), then
        make sure every process we started is gone, in order -- guests, then devices --
        gracefully, then hard."""
        guests: list[ManagedProcess] = []
        devices: list[ManagedProcess] = []
        for vm in list(self.vms.values()):
            for dev in vm.devices.values():
                for writer in dev.kick_writers.values():
                    writer.close()
            try:
                self.channel.vm_destroy(vm.id)
            except (BrokerError, PeerGoneError) as e:
                self.errors.append(f"destroying {vm.spec.name}: {e}")
            if vm.guest is not None:
                guests.append(vm.guest)
            devices += [d.process for d in vm.devices.values() if d.process is not None]
            del self.vms[vm.id]
        devices += self.switch_procs
        self._wait_serving(guests)
        for p in guests:
            p.stop()
        for p in devices:
            p.stop()

    def _wait_serving(self, procs: list[ManagedProcess], timeout: float = 5.0) -> None:
        """Ask ``procs`` to stop and wait for them while still answering I/O exits: a
        guest may be inside one (relayed before its VM was destroyed), and it would
        otherwise wait for the relay timeout before it could notice the VM is gone."""
        for p in procs:
            p.request_stop()
        deadline = time.monotonic() + timeout
        while any(p.alive for p in procs) and time.monotonic() < deadline:
            try:
                self.channel.pump()
                self.process_notices()  # exits of a destroyed VM: read as all ones
            except VbusError:
                return  # the broker is gone (or broke the protocol): so is every exit
            with contextlib.suppress(OSError):
                select.select([self.channel.fileno()], [], [], 0.05)


def parse_spec(text: str) -> tuple[list[VmSpec], list[SwitchSpec]]:
    """The VMM's JSON spec: a list of VMs, or ``{"vms": [...], "switches": [...]}``.
    A switch port device gets ``params.port`` = its index on the switch."""
    doc = json.loads(text)
    vms_doc, sw_doc = (doc, []) if isinstance(doc, list) else (doc["vms"], doc.get("switches", []))
    switches = [SwitchSpec(s["name"], tuple(s["ports"]), s.get("model", "venet")) for s in sw_doc]
    port_ids = {path: i for sw in switches for i, path in enumerate(sw.ports)}
    vms = []
    for v in vms_doc:
        devices = []
        for d in v.get("devices", []):
            params = dict(d.get("params", {}))
            path = f"{v['name']}/{d['name']}"
            if path in port_ids:
                params["port"] = port_ids[path]
            devices.append(
                DeviceSpec(
                    d["model"],
                    d["name"],
                    params,
                    int(d.get("queue_size_max", 256)),
                    restarts=int(d.get("restarts", 0)),
                    cpus=tuple(int(c) for c in d.get("cpus", ())),
                )
            )
        vms.append(
            VmSpec(
                name=v["name"],
                memory=int(v.get("memory", 16 << 20)),
                ngsi=int(v.get("ngsi", 32)),
                devices=tuple(devices),
                workload=tuple(v.get("workload", [])),
                memory_sealed=bool(v.get("memory_sealed", True)),
                device_grace=float(v.get("device_grace", 10.0)),
                guest_restarts=int(v.get("guest_restarts", 0)),
                cpus=tuple(int(c) for c in v.get("cpus", ())),
            )
        )
    return vms, switches


def main(argv: list[str] | None = None) -> int:
    """``python -m hostemu.vmm --socket PATH --spec JSON``: build, run, report, tear down."""
    parser = argparse.ArgumentParser(description="vbusemu VMM process")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--spec", required=True, help="JSON list of VM specs")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--start-together",
        action="store_true",
        help="hold each guest's workload at its start gate until every guest is there",
    )
    args = parser.parse_args(argv)
    setup_logging("vmm")
    specs, switches = parse_spec(args.spec)
    try:
        for spec in specs:  # before anything is created: a bad spec changes nothing
            check_cpus(spec.cpus, f"vm {spec.name}")
            for dspec in spec.devices:
                check_cpus(dspec.cpus, f"device {spec.name}/{dspec.name}")
    except ConfigError as e:
        print(f"vbusemu vmm: {e}", file=sys.stderr, flush=True)
        return 2
    loop = EventLoop()
    loop.install_signal_handlers()
    try:
        with Channel.connect(args.socket) as ch:
            vmm = Vmm(ch, start_together=args.start_together)
            results: dict[str, Any] = {}
            stats: dict[str, Any] = {}
            try:
                for spec in specs:
                    if not loop.signalled:
                        vmm.create_vm(spec)
                if not loop.signalled:  # told to stop meanwhile: start no process
                    vmm.start(switches)
                    results = vmm.run_until_guests_exit(loop, args.timeout)
                if not loop.signalled:
                    stats = vmm.stats()
            finally:
                vmm.shutdown()  # guests, then devices, gracefully then hard
                loop.close()
    except PeerGoneError as e:  # the broker went first: what we started is stopped
        print(f"vbusemu vmm: the broker is gone ({e})", file=sys.stderr, flush=True)
        return EXIT_BROKER_GONE
    if loop.signalled:
        return 1
    try:
        print(
            json.dumps(
                {
                    "event": "vmm_done",
                    "results": results,
                    "stats": stats,
                    "reports": vmm.reports,
                    "errors": vmm.errors,
                }
            ),
            flush=True,
        )
    except BrokenPipeError:  # whoever started us stopped listening: exit quietly
        silence_stdout()
    return 0 if not vmm.errors and len(results) == len(specs) else 1


if __name__ == "__main__":
    sys.exit(main())
