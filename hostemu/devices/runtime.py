"""The device-process runtime: guest memory, doorbells, interrupts and rings for a model.

Theory of operation
-------------------
A device process attaches on its scoped device channel. The broker then hands it, as
notices: the VM's memory slots (mapped with :class:`~shared.memory.SlotMapper`), one
*kickfd* per queue (the eventfd the VMM also bound as that queue's ioeventfd: a guest
write to the notify register signals it directly) and one *shm-signal* eventfd per MSI
vector (the eventfd the VMM also bound as an irqfd: signaling it interrupts the guest).
The VMM relays the guest's queue programming as a ``DeviceConfigNotice`` (JSON, like
vhost-user's SET_VRING_ADDR); the runtime builds a :class:`~shared.virtio.DeviceRing` for it
and answers ``DeviceConfigDone``.

On a kick the runtime drains the kickfd and runs the model's queue handler in passes of
at most :data:`BUDGET` chains, so a doorbell storm cannot monopolize the process; if work
remains it schedules another pass rather than looping. A handler completes chains with
:meth:`DeviceRuntime.complete`, which signals the queue's vector only when the ring says
the driver wants an interrupt (EVENT_IDX / NO_INTERRUPT suppression); counters record
delivered and suppressed interrupts. A ring the guest corrupted is marked broken by the
ring code; the runtime reports it to the VMM (``DeviceReport``) and ignores that queue
until it is reset -- the other queues and the process keep running.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from hostemu.device import DeviceAgent
from shared import wire
from shared.channel import Channel
from shared.errors import BrokerError, ConfigError, PeerGoneError, VbusError
from shared.fds import EventConsumer
from shared.loop import ControlPipe, EventLoop
from shared.memory import SlotMapper
from shared.virtio import DeviceRing

BUDGET = 256
"""Chains one pass of a queue handler may take before yielding to other events."""


@dataclass(eq=False)
class Queue:
    index: int
    ring: DeviceRing
    vector: int
    reported_broken: bool = False


class DeviceModel:
    """What a device does with its queues. Subclasses override :meth:`on_queue`."""

    name = "model"
    # A high-rate model runs its rings on the compiled kernels (VBUSEMU_JIT permitting);
    # a low-rate one keeps the reference path, and its process never imports numba.
    data_path = False
    kicks_announce_ring_work = False
    """True when a kick means only "look at the ring" (the model's work is exactly what
    ``ring.has_available()`` shows): the runtime then serves the ring first and reads the
    kick after, off the path from kick to interrupt. A model whose passes are driven by
    the kicks themselves (one pass per kick read, say) keeps the default: read, then
    serve."""

    def attach(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime

    def on_queue(self, q: Queue) -> bool:
        """Process available chains of ``q``; return True if work may remain."""
        return False

    def on_queue_ready(self, q: Queue) -> None:
        """``q`` was (re)configured by the driver."""

    def on_reset(self) -> None:
        """The driver reset the device: forget every chain taken from the old rings."""

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release the model's own resources (files, peers)."""


def no_params(model: str, params: dict[str, Any]) -> None:
    """For models that take no options: a stray option is a configuration error."""
    if params:
        raise ConfigError(f"{model} takes no options, got {sorted(params)}")


class DeviceRuntime(DeviceAgent):
    """A device process with guest memory, kickfds, vectors and rings."""

    def __init__(
        self,
        channel: Channel,
        control: ControlPipe,
        model: DeviceModel,
        loop: EventLoop | None = None,
    ) -> None:
        super().__init__(channel, control, loop)
        self.memory = SlotMapper()
        self.kicks: dict[int, tuple[int, EventConsumer]] = {}  # queue -> (binding, fd)
        self.queues: dict[int, Queue] = {}
        self.counters: Counter[str] = Counter()
        self.model = model
        self._scheduled: set[int] = set()
        self.group: list[DeviceRuntime] = []  # set on the control owner of a group
        model.attach(self)

    # ------------------------------------------------------------------ notices

    def handle_notice(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.MemslotAttach):
            self.memory.attach(msg.slot, msg.gpa, msg.size, msg.offset, msg.fds[0].move())
        elif isinstance(msg, wire.MemslotDetach):
            self.memory.detach(msg.slot)
        elif isinstance(msg, wire.KickfdAttach):
            consumer = EventConsumer(msg.fds[0].move())
            self.kicks[msg.queue] = (msg.binding, consumer)
            self.loop.watch(consumer.fileno(), functools.partial(self._on_kick, msg.queue))
        elif isinstance(msg, wire.Detach) and self._detach_kick(msg.binding):
            self.channel.ack_detach(msg.binding)
        elif isinstance(msg, wire.DeviceConfigNotice):
            self._configure(msg.token, msg.text)
        else:
            super().handle_notice(msg)
            return
        msg.close_fds()

    def _detach_kick(self, binding: int) -> bool:
        for queue, (b, consumer) in list(self.kicks.items()):
            if b == binding:
                self.loop.unwatch(consumer.fileno())
                consumer.close()
                del self.kicks[queue]
                return True
        return False

    def _configure(self, token: int, text: str) -> None:
        errno, detail = 0, ""
        try:
            self.apply_config(json.loads(text))
        except (ValueError, KeyError, TypeError, VbusError) as e:
            errno, detail = 22, f"bad device configuration: {e}"  # EINVAL
        self.channel.send(wire.DeviceConfigDone(token=token, errno=errno, text=detail))

    def apply_config(self, cfg: dict[str, Any]) -> None:
        op = cfg["op"]
        if op == "queue":
            q = int(cfg["queue"])
            resume = bool(cfg.get("resume", False))
            start = self._used_index(int(cfg["used"])) if resume else 0
            ring = DeviceRing(
                self.memory.map,
                int(cfg["desc"]),
                int(cfg["avail"]),
                int(cfg["used"]),
                int(cfg["size"]),
                event_idx=bool(cfg.get("event_idx", False)),
                start_index=start,
                jit=None if self.model.data_path else False,
            )
            queue = self.queues[q] = Queue(q, ring, int(cfg["vector"]))
            self.model.on_queue_ready(queue)
            if ring.broken:
                self.report_broken(queue)
            else:
                self.schedule(q)  # buffers posted before enable must not be missed
                if resume:
                    # A kick the old process consumed, or an interrupt it never sent,
                    # must not be lost: look at the ring once (above) and interrupt the
                    # driver once, so both sides re-check.
                    self.counters["queues_resumed"] += 1
                    self.interrupt(queue.vector)
        elif op == "disable":
            self.queues.pop(int(cfg["queue"]), None)
        elif op == "reset":
            self.queues.clear()
            self.model.on_reset()
        else:
            raise KeyError(f"op {op!r}")

    def _used_index(self, used_gpa: int) -> int:
        """Where a restarted device resumes a queue: the used ring's ``idx`` as the guest
        sees it (what the dead process completed), like a vhost-user backend reconnecting
        without inflight tracking. Chains it had taken but not completed are taken again:
        correct for models that complete in order and whose requests are idempotent (blk
        writes; echo completes a frame only once its copy was delivered). An unreadable
        address resumes at 0 and the ring constructor marks the queue broken."""
        try:
            return int.from_bytes(self.memory.map.read(used_gpa + 2, 2), "little")
        except VbusError:
            return 0

    # ------------------------------------------------------------------ data path

    def _on_kick(self, queue: int) -> None:
        entry = self.kicks.get(queue)
        if entry is None:
            return
        if not self.model.kicks_announce_ring_work:
            if entry[1].drain():
                self.counters["kicks"] += 1
            self._run_queue(queue)
            return
        # Serve the ring first and read the kick after: the read is then off the path
        # from the guest's kick to our interrupt. A kick that lands meanwhile is read along
        # with it, so the ring is checked again after the read -- consume the notice, then
        # look, as everywhere (a pass that left kicks on had already re-checked, but only
        # before this read).
        self._run_queue(queue)
        if self.kicks.get(queue) is entry and entry[1].drain():
            self.counters["kicks"] += 1
        q = self.queues.get(queue)
        if (
            q is not None
            and queue not in self._scheduled
            and not q.ring.broken
            and q.ring.has_available()
        ):
            self.schedule(queue)

    def schedule(self, queue: int) -> None:
        """Run ``queue``'s handler on the next loop pass (bounded work per pass)."""
        if queue not in self._scheduled:
            self._scheduled.add(queue)
            self.loop.call_at(time.monotonic(), functools.partial(self._run_queue, queue))

    def _run_queue(self, queue: int) -> None:
        self._scheduled.discard(queue)
        q = self.queues.get(queue)
        if q is None or q.ring.broken:
            return
        before = q.ring.last_avail
        more = self.model.on_queue(q)
        # A handler may break another queue's ring too (echo fills RX from its TX handler):
        # report every broken queue, or one found broken there would never be reported.
        for other in list(self.queues.values()):  # a report may reconfigure the queues
            if other.ring.broken and not other.reported_broken:
                self.report_broken(other)
        if q.ring.broken:
            return
        if self.loop.spinning((self, queue)) and q.ring.notifications_enabled:
            # The model re-enabled kicks (it found the ring empty), but the busy loop still
            # polls the ring: keep them off, or the guest pays a doorbell per request.
            q.ring.disable_notifications()
        if more:
            self.schedule(queue)
        elif (
            queue in self.busy_poll
            and not self.loop.spinning((self, queue))
            and not (q.ring.last_avail == before and q.ring.has_available())
        ):
            # (not when the model left requests untaken: it waits for something else --
            # back-pressure -- and polling would only spin on them)
            self._start_busy_poll(q, self.busy_poll[queue])

    # ------------------------------------------------------------------ busy polling

    busy_poll: Mapping[int, int] = MappingProxyType({})
    """Queue -> busy-polling window in ns: vhost's busyloop (``busyloop_timeout``). After a
    pass, keep polling that queue's available ring this long with its kicks disabled -- the
    guest saves the doorbell and we save the wakeup -- then re-enable kicks, re-check and
    sleep. Each new request restarts the window. Empty by default (never poll); a model
    sets it from its options."""
    BUSY_SLICE_NS = 20_000
    """Longest stretch the busy loop spins before the event loop polls its fds once (the stop
    eventfd, the control pipe, the channel, other queues' kicks, timers)."""

    def _start_busy_poll(self, q: Queue, window_ns: int) -> None:
        q.ring.disable_notifications()
        deadline = [time.monotonic_ns() + window_ns]
        self.counters["busy_polls"] += 1
        self.loop.spin((self, q.index), functools.partial(self._busy_poll, q, window_ns, deadline))

    def _busy_poll(self, q: Queue, window_ns: int, deadline: list[int]) -> bool:
        """One slice (at most :attr:`BUSY_SLICE_NS`) of the busy loop; False once it is over
        (kicks re-enabled)."""
        ring = q.ring
        if self.queues.get(q.index) is not q or ring.broken:
            return False  # reconfigured or broken meanwhile: a new ring starts with kicks on
        clock = time.monotonic_ns
        now = clock()
        slice_end = now + self.BUSY_SLICE_NS
        if self.loop.cpu_contended:
            # Another task wanted this CPU (the loop's yield between slices took long):
            # stop polling and sleep, as vhost does on need_resched().
            self.counters["busy_polls_contended"] += 1
            deadline[0] = now
        while now < slice_end:
            if ring.has_available():
                before = ring.last_avail
                self._run_queue(q.index)
                if self.queues.get(q.index) is not q or ring.broken:
                    return False
                if ring.last_avail == before:
                    break  # nothing taken (back-pressure): stop polling, see below
                self.counters["busy_poll_hits"] += 1
                deadline[0] = clock() + window_ns  # new requests: the window restarts
            now = clock()
            if now >= deadline[0]:
                break
        else:
            return True  # the slice is over, the window is not: spin again after a poll
        # Over: kicks back on, then re-check (no lost kick) before sleeping.
        if ring.enable_notifications():
            self.schedule(q.index)
        return False

    def complete(self, q: Queue, ids: Any, lens: Any) -> None:
        """Return chains to the driver; interrupt it only if it asked to be."""
        self.used_published(q, q.ring.push_used(ids, lens))

    def used_published(self, q: Queue, interrupt: bool) -> None:
        """After ``q``'s used entries were published: interrupt the driver if the ring said
        so (``interrupt``), else count the suppressed interrupt."""
        if interrupt:
            self.interrupt(q.vector)
        else:
            self.counters["interrupts_suppressed"] += 1

    def interrupt(self, vector: int) -> None:
        entry = self.signals.get(vector)
        if entry is None:
            self.counters["interrupts_unrouted"] += 1  # the driver has not programmed it
            return
        entry[1].notify(1)
        self.counters["interrupts"] += 1

    def report_broken(self, q: Queue) -> None:
        """Tell the VMM (once) that ``q``'s ring is broken; the queue stays stopped."""
        if q.reported_broken:
            return
        q.reported_broken = True
        self.counters["queues_broken"] += 1
        self.emit("queue_broken", queue=q.index, reason=q.ring.broken)
        # If the broker refuses or is gone, the guest still sees the queue stop.
        with contextlib.suppress(BrokerError, PeerGoneError):
            self.channel.request(
                wire.DeviceReport(
                    text=json.dumps(
                        {"event": "queue_broken", "queue": q.index, "reason": q.ring.broken}
                    )
                )
            )

    # ------------------------------------------------------------------ control

    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        if cmd.get("cmd") == "stats":
            if self.group:  # one process serving several devices: everyone's counters
                return {"ports": [r.device_stats() for r in self.group]}
            return {**super().handle_command(cmd), **self.device_stats()}  # type: ignore[dict-item]
        return super().handle_command(cmd)

    def device_stats(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "model": self.model.stats(),
            "cpus": sorted(os.sched_getaffinity(0)),
            "queues": {
                str(i): {"broken": q.ring.broken, "in_flight": q.ring.in_flight}
                for i, q in self.queues.items()
            },
        }

    def shutdown(self) -> None:
        self.model.close()
        for _, consumer in self.kicks.values():
            consumer.close()
        self.kicks.clear()
        self.queues.clear()
        self.memory.close()
        super().shutdown()
