"""The guest process skeleton: attach to one VM, take irqfds, count interrupts.

Started by a VMM (or a test) with a scoped VM channel inherited as an fd::

    python -m guestemu.guest --channel-fd N [--name vm0]

It attaches to its VM; the broker then hands it, as notices carrying real eventfds,
every irqfd (gsi + eventfd [+ resamplefd]) and ioeventfd of the VM, now and whenever
the VMM assigns more. It waits on the irqfds with epoll (edge-triggered: one interrupt
per write, like KVM's irqfd; a count already pending at attach is injected once and left
in the eventfd), counts signals per gsi, takes and EOIs every interrupt at once (an EOI
signals the resamplefds of the gsi's level-triggered lines), and acknowledges detach
requests only after it has stopped watching and drained the eventfd -- so once the VMM's
deassign returns, no further interrupt from that binding is counted.

Control commands (JSON lines on stdin): ``stats [settle]`` (``settle``: first deliver
every write made before the command), ``wait_total {gsi, total, timeout}``, ``io_write
{addr, len, value, pio}`` (the ioeventfd fast path), ``hold_interrupts {hold}`` (like a
vCPU's ``cli``/``sti``: while held, interrupts are latched, not taken, and
level-triggered lines stay asserted), ``take_interrupts`` (take and EOI every latched
interrupt now; replies ``took``, the gsis in the order taken), ``go`` (opens the start
gate, see :meth:`GuestAgent.wait_start`), ``quit``.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from guestemu.irq import InterruptController, IoEventFd, IoEventTable
from guestemu.vcpu import ADAPTIVE, Vcpu
from guestemu.workloads import load as load_workload
from shared import wire
from shared.channel import Channel
from shared.errors import VbusError
from shared.fds import EventNotifier, OwnedFd
from shared.loop import EXIT_ERROR, Agent, ControlPipe, setup_logging
from shared.memory import SlotMapper


class GuestAgent(Agent):
    name = "guest"

    def __init__(
        self,
        channel: Channel,
        control: ControlPipe,
        workload: Callable[[GuestAgent], dict[str, Any]] | None = None,
        halt_poll_ns: int = ADAPTIVE,
        device_grace: float = 0.0,
        start_gate: bool = False,
    ) -> None:
        super().__init__(channel, control)
        # --start-gate: a workload that calls wait_start() holds there until the VMM says go
        self.start_gate = start_gate
        self._go = False
        self.irq = InterruptController()
        self.io = IoEventTable()
        self.memory = SlotMapper()
        self.vcpu = Vcpu(self, halt_poll_ns=halt_poll_ns)
        self.workload = workload
        # device id -> when its process went away; a halted vCPU waiting on it fails once
        # ``device_grace`` seconds passed without the device coming back (restarted).
        self.devices_gone: dict[int, float] = {}
        self.device_grace = max(0.0, device_grace)
        self.device_returns = 0
        self.detached: list[dict[str, Any]] = []
        self._waiters: list[tuple[dict[str, Any], int, int, float]] = []

    def main(self) -> None:
        """Without a workload, serve events; with one, run it on the vCPU and report."""
        if self.workload is None:
            super().main()
            return
        try:
            result = self.workload(self)
        except VbusError as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self.emit("workload_done", **result)
        if not result.get("ok"):
            self.exit_code = EXIT_ERROR

    def wait_start(self, timeout: float = 120.0) -> None:
        """The start gate, for a workload between its set-up (boot, rings) and what it
        measures. Without ``--start-gate`` it returns at once; with it, the guest reports
        ``start_gate`` and serves its event loop until the ``go`` command (the VMM sends
        it once every guest of the run is at its gate), so VMs measured together start
        together instead of each as soon as it has booted."""
        if not self.start_gate or self._go:
            return
        self.emit("start_gate")
        deadline = time.monotonic() + timeout
        while not self._go:
            left = deadline - time.monotonic()
            if self.loop.stopping or self.control.eof or left <= 0:
                raise VbusError("start gate: no go command" + (" in time" if left <= 0 else ""))
            self.loop.poll_once(left)

    # ------------------------------------------------------------------ notices

    def handle_notice(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.MemslotAttach):
            self.memory.attach(msg.slot, msg.gpa, msg.size, msg.offset, msg.fds[0].move())
        elif isinstance(msg, wire.MemslotDetach):
            self.memory.detach(msg.slot)
        elif isinstance(msg, wire.IrqfdAttach | wire.IrqfdAttachResample):
            resample = msg.fds[1].move() if len(msg.fds) == 2 else None
            line = self.irq.add(msg.binding, msg.gsi, msg.fds[0].move(), resample)
            if msg.gsi not in self.irq.masked:
                self.loop.watch(line.fileno(), functools.partial(self._on_irq, msg.binding))
            # A count already pending is injected once (not read) by the loop, not here:
            # this notice may have arrived while the vCPU waits inside an exit. The
            # attach is reported after that injection.
            self.loop.call_at(
                time.monotonic(),
                functools.partial(self._attached, msg.binding, msg.gsi, resample is not None),
            )
        elif isinstance(msg, wire.IoeventfdAttach):
            pio = bool(msg.flags & wire.IOEVENTFD_FLAG_PIO)
            dm = msg.datamatch if msg.flags & wire.IOEVENTFD_FLAG_DATAMATCH else None
            self.io.add(
                IoEventFd(msg.binding, pio, msg.addr, msg.len, dm, EventNotifier(msg.fds[0].move()))
            )
            self.emit("ioeventfd_attached", binding=msg.binding, addr=msg.addr)
        elif isinstance(msg, wire.Detach):
            self._detach(msg.binding, wire.DetachReason(msg.reason))
        elif isinstance(msg, wire.PeerGone) and msg.kind == wire.PeerKind.DEVICE:
            self.devices_gone.setdefault(msg.id, time.monotonic())  # halts fail, not hang
        elif isinstance(msg, wire.PeerAttached) and msg.kind == wire.PeerKind.DEVICE:
            if self.devices_gone.pop(msg.id, None) is not None:
                self.device_returns += 1
                self.emit("device_returned", device=msg.id)
        elif isinstance(msg, wire.PeerGone) and msg.kind == wire.PeerKind.VM:
            self.loop.stop()
        msg.close_fds()

    def _attached(self, binding: int, gsi: int, level: bool) -> None:
        line = self.irq.lines.get(binding)
        if line is not None and line.held:
            self._on_irq(binding)
        self.emit("irqfd_attached", binding=binding, gsi=gsi, level=level)

    def lost_devices(self) -> list[int]:
        """Devices gone for longer than the grace period: what waits on them never comes."""
        limit = time.monotonic() - self.device_grace
        return sorted(d for d, since in self.devices_gone.items() if since <= limit)

    def _detach(self, binding: int, reason: wire.DetachReason) -> None:
        event: dict[str, Any] = {"binding": binding, "reason": reason.name.lower()}
        line = self.irq.lines.get(binding)
        if line is not None:
            if line.gsi not in self.irq.masked:
                self.loop.unwatch(line.fileno())
            event.update(gsi=line.gsi, drained=self.irq.remove(binding))
        elif self.io.remove(binding):
            event.update(kind="ioeventfd")
        # Only now, with nothing left to deliver, may the broker answer the deassign.
        self.channel.ack_detach(binding)
        self.detached.append(event)
        self.emit("detached", **event)

    def set_masked(self, gsi: int, masked: bool) -> None:
        """Mask: stop watching the gsi's lines (their signals stay pending in the eventfds).
        Unmask: watch them again; writes made meanwhile are delivered on the next poll, a
        count held since attach is injected now."""
        if masked == (gsi in self.irq.masked):
            return
        (self.irq.mask if masked else self.irq.unmask)(gsi)
        for binding, line in list(self.irq.lines.items()):
            if line.gsi == gsi:
                if masked:
                    self.loop.unwatch(line.fileno())
                else:
                    self.loop.watch(line.fileno(), functools.partial(self._on_irq, binding))
                    if line.held:
                        self._on_irq(binding)

    def _on_irq(self, binding: int) -> None:
        if binding not in self.irq.lines:
            return
        irq = self.irq
        if irq.deliver(binding):
            # the handler services it at once (an EOI matters only where a gsi has a
            # level or a resampler: skipped on the common edge-only path)
            if not irq.holding and (irq.level or irq.resamplers):
                irq.eoi(irq.lines[binding].gsi)
            if self._waiters:
                self._check_waiters()

    def settle(self) -> None:
        """Deliver every write already made to a watched line (what the loop would do on
        its next turn), so a reply after this reflects every signal made before."""
        for binding, line in list(self.irq.lines.items()):
            if line.gsi not in self.irq.masked:
                self._on_irq(binding)

    # ------------------------------------------------------------------ commands

    def _stats(self) -> dict[str, Any]:
        return {
            "delivered": {str(k): v for k, v in self.irq.delivered.items()},
            "wakeups": {str(k): v for k, v in self.irq.wakeups.items()},
            "drained_at_detach": {str(k): v for k, v in self.irq.drained_at_detach.items()},
            "eois": {str(k): v for k, v in self.irq.eois.items()},
            "level": sorted(self.irq.level),
            "requested": sorted(self.irq.requested),
            "irqfds": sorted(line.gsi for line in self.irq.lines.values()),
            "ioeventfds": len(self.io.entries),
            "detached": self.detached,
        }

    def _check_waiters(self) -> None:
        keep = []
        for cmd, gsi, total, deadline in self._waiters:
            have = self.irq.delivered[gsi]
            if have >= total:
                self.reply(cmd, ok=have == total, delivered=have)
            elif time.monotonic() >= deadline:
                self.reply(cmd, ok=False, delivered=have, error="timeout")
            else:
                keep.append((cmd, gsi, total, deadline))
        self._waiters = keep

    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        name = cmd.get("cmd")
        if name == "stats":
            if cmd.get("settle"):
                self.settle()
            return self._stats()
        if name == "hold_interrupts":
            return {"took": self.irq.hold(bool(cmd["hold"]))}
        if name == "take_interrupts":
            self.settle()
            return {"took": self.irq.take()}
        if name == "go":
            self._go = True
            return {}
        if name == "wait_total":
            deadline = time.monotonic() + float(cmd.get("timeout", 10.0))
            self._waiters.append((cmd, int(cmd["gsi"]), int(cmd["total"]), deadline))
            self.loop.call_at(deadline, self._check_waiters)
            self._check_waiters()
            return None
        if name in ("mask", "unmask"):
            gsi = int(cmd["gsi"])
            self.set_masked(gsi, name == "mask")
            return {"masked": sorted(self.irq.masked)}
        if name == "exec_probe":
            # Fork and exec a helper that inherits every fd not marked close-on-exec
            # (close_fds=False on purpose): it must see none of our eventfds or memory.
            out = subprocess.run(
                ["ls", "-l", "/proc/self/fd"],
                close_fds=False,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            return {
                "fds": [
                    line.split(" -> ", 1)[1] for line in out.stdout.splitlines() if " -> " in line
                ]
            }
        if name == "io_write":
            hit = self.io.write(
                bool(cmd.get("pio", False)),
                int(cmd["addr"]),
                int(cmd["len"]),
                int(cmd.get("value", 0)),
            )
            return {"hit": hit}
        raise KeyError(name)

    def shutdown(self) -> None:
        self.irq.close()
        self.io.close()
        self.memory.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vbusemu guest process")
    parser.add_argument(
        "--channel-fd",
        type=int,
        required=True,
        help="inherited fd of the VM channel the VMM opened",
    )
    parser.add_argument("--name", default="guest")
    parser.add_argument(
        "--workload",
        default=None,
        help="run this workload (a module of guestemu.workloads) after boot, report it, and exit",
    )
    parser.add_argument("--params", default="{}", help="the workload's parameters (JSON)")
    parser.add_argument(
        "--halt-poll-ns",
        type=int,
        default=ADAPTIVE,
        help="halt-polling window; -1 = adaptive (default), 0 = never poll",
    )
    parser.add_argument(
        "--device-grace",
        type=float,
        default=0.0,
        help="seconds a halted vCPU waits for a device whose process died "
        "to come back (the VMM restarts it) before failing; 0 = fail now",
    )
    parser.add_argument(
        "--start-gate",
        action="store_true",
        help="hold the workload at its start gate (after boot) until the go command",
    )
    args = parser.parse_args(argv)
    setup_logging(args.name)
    workload = None
    if args.workload is not None:
        run = load_workload(args.workload)
        params = json.loads(args.params)

        def workload(agent: GuestAgent) -> dict[str, Any]:
            return run(agent, params)

    agent = GuestAgent(
        Channel.adopt(OwnedFd(args.channel_fd)),
        ControlPipe(),
        workload,
        halt_poll_ns=args.halt_poll_ns,
        device_grace=args.device_grace,
        start_gate=args.start_gate,
    )
    agent.name = args.name
    return agent.run()


if __name__ == "__main__":
    raise SystemExit(main())
