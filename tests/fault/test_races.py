"""Races between the control plane's teardown paths.

The broker is one thread, so a "race" between two clients is the order in which their
frames reach it: every test below makes both sides happen at once -- a request posted
without waiting while another connection hangs up, a process killed by SIGKILL at a
randomized point, two client threads juggling the same eventfds -- over many rounds, and
checks that each interleaving occurred (or reports how often). Rounds are CI-sized;
``VBUSEMU_ROUNDS=N`` multiplies them, ``VBUSEMU_SEED`` replays a run's random choices.

After every scenario (see :func:`tests.fault.racekit.assert_clean`): the broker's open-fd
count is back to its baseline, /dev/shm gained nothing, the broker has no child process,
its table is empty, no reference count went negative, it answered every ping within a
second, and its log (and every child's) has no traceback. The autouse leak guard checks
the test process itself.

1. **Deassign vs. peer-gone teardown of the same binding** (thousands of rounds, two
   flavours). Theory: a binding leaves every index when it is deactivated and drops its
   references once, when its detach finishes; whichever path comes second must find it
   gone and do nothing. (a) The consumer (guest) exits while the VMM's deassign is in
   flight: either the deassign wins (the guest is sent one Detach, its exit finishes the
   detach) or the exit wins (the binding loses its consumer and the deassign releases it
   at once). (b) Under ``hup``, another client holding the eventfd's last handle exits
   while the VMM deassigns by gsi: the guest gets exactly one Detach, reason DEASSIGN or
   HUP. The two frames leave in a random order a random few microseconds apart, the gap
   adapting so that both orders keep winning (:class:`~tests.fault.racekit.Straddle`).
   Oracle: one Detach at most (exactly one in b), the deassign answers Ok -- and, when it
   started the detach, only after the ack (a ping posted behind it is answered first) --,
   the object's counts return to (1, 0) or it is freed, never below zero; one PeerGone
   per exit; both orders happened.
   :func:`test_deassign_waits_for_a_hup_detach_of_its_gsi_to_be_acked` is the regression
   test of what (b) found: when the HUP won, the deassign returned while the guest still
   held the binding. Now, like KVM's deassign flushing its irqfd cleanup queue, it waits
   for a detach of that VM's gsi already in progress.
2. **A client killed while its assign is in flight** (both policies). A child VMM
   (:mod:`tests.fault.assign_child`) loops assign/deassign; the test, its VM's guest,
   SIGKILLs it by pid at a random moment after it began an assign, and reaps it. A
   SOCK_SEQPACKET frame is sent whole or not at all, and a dead client's queued frames
   are still read (or all dropped, on ECONNRESET), so the assign is either installed --
   the guest got an attach -- and then torn down (HUP, or with the VM), or never
   installed. Oracle: the guest saw k-1 or k attaches for k assigns begun, every
   attached binding got exactly one Detach, the broker is clean after every kill. The
   kill delay adapts until both "never installed" and "installed, the reply lost with
   the child" have happened (the child busy-waits between beginning an assign and
   sending it, so that a kill can land on either side of the send).
3. **A port of KVM's irqfd selftest** (tools/testing/selftests/kvm/irqfd_test.c). A
   primary client creates an eventfd per round, assigns it twice on each of its two VMs
   (the second assign must fail: one eventfd, one irqfd), deassigns both gsis (always Ok,
   assigned or not) and closes it; meanwhile a second client, in its own thread and on
   its own two VMs, imports each of the primary's eventfds and juggles them *by the
   primary's current handle number* (both connections number their handles in step, so
   a number names the same eventfd on both sides -- or nothing, when the secondary lags
   or has moved on: EBADF). Guests on all four VMs acknowledge every detach. Oracle: only
   ok / EBUSY / EBADF answers (each seen), EBUSY across clients and VMs (seen), the
   registry empty at the end, under both release policies.
4. **Signal before assign, signals during deassign** (a real guest process). A count
   pending at assign time is injected once and left in the eventfd (KVM polls after
   hooking, without reading): n signals written before the assign are one interrupt
   that takes nothing, and none follows; the next signal takes all n+1 (one more
   interrupt), or else the deassign does. A
   thread signals the eventfd while the VMM deassigns it (every other round with the
   guest SIGSTOPped across the deassign, so the broker must hold its answer until the
   continued guest acknowledges): when the deassign returns the guest has detached, the
   signals it took plus those left in the counter add up to every signal written, and it
   takes none after the return.
5. **A routing cycle at full rate.** The ``cycle`` device (:mod:`hostemu.devices.cycle`)
   answers each doorbell with an interrupt; the ``cycle`` workload's
   (:mod:`guestemu.workloads.cycle`) interrupt handler rings the same doorbell twice.
   Every hop is an eventfd counter, so the multiplying signals coalesce: the largest
   counter any interrupt drained stays small, the device's passes never exceed the
   doorbells, no interrupt waits more than a second (no deadlock), neither handler is
   re-entered and their stack depths stay flat (no recursion), and the broker -- not on
   this path at all -- answers pings throughout.
6. **Counter semantics at teardown.** A semaphore-mode irqfd whose count is 0 is drained
   at detach without blocking or underflow (0 drained, the counter still 0); a normal one
   signaled 100,000 times while its gsi was masked is drained as one value, 100000 --
   after an explicit deassign and at VM teardown.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import queue
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostemu.launcher import ManagedProcess, python_module, spawn_guest
from shared import wire
from shared.channel import Channel
from shared.errors import BrokerError
from shared.fds import OwnedFd, eventfd_info, new_eventfd, recv_with_fds
from shared.wire import DetachReason, PeerKind, Policy
from tests import timing
from tests.conftest import BrokerHandle
from tests.fault.racekit import (
    GuestSide,
    Peer,
    Straddle,
    assert_clean,
    assert_counts_sane,
    baseline,
    ping,
    scale,
    scaled,
    spin,
)
from tests.integration.conftest import Vmm
from tests.unit.test_table import NO, Harness, world

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("VBUSEMU_SEED", random.randrange(1 << 32)))
DEASSIGN = wire.IRQFD_FLAG_DEASSIGN


def rng_for(name: str) -> random.Random:
    print(f"{name}: VBUSEMU_SEED={SEED}")
    return random.Random(f"{SEED}-{name}")


def answer(ch: Channel, vm: int, handle: int, gsi: int, flags: int = 0) -> str:
    """An irqfd request's outcome: ``"ok"`` or the errno's name."""
    try:
        ch.call(
            wire.Irqfd(vm=vm, handle=handle, gsi=gsi, flags=flags),
            wire.Ok if flags & DEASSIGN else wire.IdReply,
        )
    except BrokerError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


# ---------------------------------------------------------------------- teardown against deassign


@pytest.mark.timeout(120)
def test_deassign_racing_consumer_exit_tears_down_once(broker: BrokerHandle) -> None:
    """The guest exits while the VMM's deassign of its irqfd is in flight."""
    race = Straddle(rng_for("consumer-exit"))
    rounds = scaled(2000)
    ctl = Peer.connect(broker.path)
    try:
        base = baseline(ctl.channel)
        vm = ctl.channel.vm_create(ngsi=8)
        handle = ctl.channel.eventfd_create()
        outcomes: Counter[str] = Counter()
        worst = 0.0
        t0 = time.monotonic()
        for i in range(rounds):
            gsi = i % 8
            guest = Peer.adopt(ctl.channel.channel_open(wire.Scope.VM, vm))
            try:
                guest.channel.attach()
                binding = ctl.channel.irqfd_assign(vm, handle, gsi)
                deassign = wire.Irqfd(vm=vm, handle=handle, gsi=gsi, flags=DEASSIGN)
                seq = race.fire(functools.partial(ctl.post, deassign), guest.hangup)
                reply = ctl.reply(seq)
                assert isinstance(reply, wire.Ok), reply
                frames = guest.drain()  # until the broker let go of the guest
            finally:
                guest.close()
            for m in frames:
                m.close_fds()
            assert [m.binding for m in frames if isinstance(m, wire.IrqfdAttach)] == [binding]
            detaches = [(m.binding, m.reason) for m in frames if isinstance(m, wire.Detach)]
            assert detaches in ([], [(binding, DetachReason.DEASSIGN)]), detaches
            outcomes["deassign first" if detaches else "exit first"] += 1
            race.result(bool(detaches))
            state = ctl.channel.state()  # after the PeerGone the exit sent us
            assert_counts_sane(state)
            assert state["bindings"] == [], state["bindings"]
            (obj,) = state["objects"]
            assert (obj["handles"], obj["bindings"]) == (1, 0), obj
            gone = ctl.take(wire.PeerGone)
            assert [(g.kind, g.id) for g in gone if isinstance(g, wire.PeerGone)] == [
                (PeerKind.GUEST, vm)
            ], gone
            ctl.take(wire.PeerAttached)
            if i % 50 == 0:
                worst = max(worst, ping(ctl.channel, i))
        print(
            f"{rounds} rounds in {time.monotonic() - t0:.1f} s: {dict(outcomes)}; "
            f"worst ping {worst * 1e3:.1f} ms"
        )
        assert outcomes["deassign first"] and outcomes["exit first"], outcomes
        ctl.channel.vm_destroy(vm)
        ctl.channel.handle_close(handle)
        assert_clean(broker, ctl.channel, base)
    finally:
        ctl.close()


@pytest.mark.timeout(120)
def test_deassign_racing_hup_detaches_once(broker: BrokerHandle) -> None:
    """Policy ``hup``: the client holding the last handle exits while the
    VMM deassigns the irqfd by gsi; the guest is told exactly once, whoever wins."""
    race = Straddle(rng_for("hup"))
    rounds = scaled(1500)
    ctl = Peer.connect(broker.path)
    guest: GuestSide | None = None
    try:
        base = baseline(ctl.channel)
        vm = ctl.channel.vm_create(ngsi=8)
        guest = GuestSide.attach(ctl.channel, vm)
        outcomes: Counter[str] = Counter()
        worst = 0.0
        t0 = time.monotonic()
        for i in range(rounds):
            gsi = i % 8
            handle = ctl.channel.eventfd_create()
            holder = Peer.connect(broker.path)
            try:
                with ctl.channel.handle_fd(handle) as fd:
                    holder.channel.eventfd_import(fd)
                binding = ctl.channel.irqfd_assign(vm, handle, gsi)
                ctl.channel.handle_close(handle)  # the holder has the last handle now
                guest.wait_attached(binding)
                deassign = wire.Irqfd(vm=vm, handle=wire.NO_HANDLE, gsi=gsi, flags=DEASSIGN)
                seq = race.fire(functools.partial(ctl.post, deassign), holder.hangup)
                msg = guest.peer.next()
                assert isinstance(msg, wire.Detach) and msg.binding == binding, msg
                reason = DetachReason(msg.reason)
                # Everything the broker does for ctl before a ping is answered first.
                probe = ctl.post(wire.Ping(token=i))
                assert isinstance(ctl.reply(probe), wire.Pong)
                # Whichever started the detach, the deassign returns only after the ack
                # (regression: test_deassign_waits_for_a_hup_detach_of_its_gsi_to_be_acked).
                assert not ctl.replied(seq), (
                    f"deassign answered before the {reason.name} detach was acked"
                )
                guest.absorb([msg])  # acknowledges
                assert isinstance(ctl.reply(seq), wire.Ok)
                holder.drain()
            finally:
                holder.close()
            guest.peer.channel.ping(i)  # any second Detach would have come before the pong
            extra = guest.peer.poll()
            assert extra == [], extra
            assert guest.detached.count((binding, reason)) == 1
            outcomes[reason.name] += 1
            race.result(reason is DetachReason.DEASSIGN)
            state = ctl.channel.state()
            assert_counts_sane(state)
            assert state["bindings"] == [] and state["objects"] == [], state
            if i % 50 == 0:
                worst = max(worst, ping(ctl.channel, i))
        print(
            f"{rounds} rounds in {time.monotonic() - t0:.1f} s: {dict(outcomes)}; "
            f"worst ping {worst * 1e3:.1f} ms"
        )
        assert outcomes["DEASSIGN"] and outcomes["HUP"], outcomes
        assert len(guest.detached) == rounds
        ctl.channel.vm_destroy(vm)
        guest.wait_vm_gone()
        guest.close()
        guest = None
        assert_clean(broker, ctl.channel, base)
    finally:
        if guest is not None:
            guest.close()
        ctl.close()


def test_deassign_waits_for_a_hup_detach_of_its_gsi_to_be_acked() -> None:
    """What the last-handle race finds, in the pure table: the VMM closed its handle, the client
    holding the last one exits (HUP: the guest must detach), and the VMM deassigns the
    gsi before the guest acknowledged. KVM's deassign would wait for that shutdown."""
    h = Harness(Policy.HUP)
    try:
        w = world(h, proc=False)
        assert w.guest is not None
        other = h.host()
        h.import_eventfd(other, w.efd)
        irq = h.irqfd(w.host, w.vm, w.handle, 7)
        h.notices(w.guest)
        assert isinstance(h.req(w.host, wire.HandleClose(handle=w.handle)), wire.Ok)
        h.disconnect(other)  # the last handle goes: HUP
        assert h.detaches(w.guest) == [(irq, DetachReason.HUP)]
        seq = h.send(w.host, wire.Irqfd(vm=w.vm, handle=NO, gsi=7, flags=DEASSIGN))
        assert h.reply(w.host, seq) is None, "answered while the guest still holds the irqfd"
        h.ack(w.guest, irq)
        assert isinstance(h.reply(w.host, seq), wire.Ok)
    finally:
        h.close()


# ------------------------------------------------------------------------ a VMM killed mid-assign

PRESEND_WINDOW_US = 300
"""How long the child dwells between beginning an assign and sending it (see
:mod:`tests.fault.assign_child`)."""


def kill_mid_assign(broker: BrokerHandle, target: int, delay: float, log: Path) -> str:
    """Start a child VMM, be its VM's guest, SIGKILL it ``delay`` seconds after it began
    assign number ``target``; check nothing is left half done. Returns the outcome."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    guest: GuestSide | None = None
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fault.assign_child",
                broker.path,
                str(theirs.fileno()),
                str(PRESEND_WINDOW_US),
            ],
            pass_fds=[theirs.fileno()],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
    theirs.close()
    records: list[bytes] = []
    try:
        ready, _, _ = select.select([ours], [], [], timing.scaled(15))
        assert ready, f"the child never handed over its guest channel:\n{log.read_text()}"
        got = recv_with_fds(ours, 64)
        assert got is not None and len(got[1]) == 1, got
        guest = GuestSide(Peer.adopt(got[1][0]))
        guest.peer.channel.attach()
        ours.send(b"go")
        trigger = b"A %d" % target
        ours.setblocking(False)
        deadline = timing.deadline(15)
        killed = False
        while not killed:
            r, _, _ = select.select([ours, guest.peer.sock], [], [], timing.remaining(deadline))
            assert r, f"the child stalled after {records}"
            if guest.peer.sock in r:
                guest.serve()  # acknowledges its deassigns' detaches
            while ours in r:
                try:
                    rec = ours.recv(64)
                except BlockingIOError:
                    break
                assert rec, f"the child died on its own after {records}:\n{log.read_text()}"
                records.append(rec)
                if rec == trigger:
                    spin(delay)
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
        assert proc.wait(timing.scaled(10)) == -signal.SIGKILL
        ours.setblocking(True)
        ours.settimeout(timing.scaled(10))
        while rec := ours.recv(64):  # what it reported before it died
            records.append(rec)
        guest.wait_vm_gone()  # its VM is torn down: a crash is a leave
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timing.scaled(10))
        ours.close()
        if guest is not None:
            guest.close()
    assert "Traceback" not in log.read_text(), log.read_text()
    assert guest is not None
    begun = max(int(r.split()[1]) for r in records if r.startswith(b"A "))
    answered = {int(r.split()[1]): int(r.split()[2]) for r in records if r.startswith(b"R ")}
    attached = list(guest.attached)
    assert len(attached) in (begun - 1, begun), (begun, attached, records)
    assert set(answered.values()) <= set(attached), (answered, attached)
    assert Counter(b for b, _ in guest.detached) == Counter(attached), (
        guest.detached,
        attached,
    )  # each installed binding torn down exactly once
    if len(attached) == begun - 1:
        return "never installed"
    return "installed, answered" if begun in answered else "installed, reply lost"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name.lower())
def test_client_killed_with_assign_in_flight_never_leaves_half_a_binding(
    broker_factory: Callable[..., BrokerHandle], sockdir: Path, policy: Policy
) -> None:
    """SIGKILL a VMM process at randomized points of an irqfd assign. Its
    binding goes by HUP (its handle was the last) or with its VM (``refcount``)."""
    broker = broker_factory(policy)
    rng = rng_for(f"kill-{policy.name}")
    ctl = broker.connect()
    base = baseline(ctl)
    outcomes: Counter[str] = Counter()
    kills = 0
    hi = 2 * PRESEND_WINDOW_US * 1e-6
    t0 = time.monotonic()
    while kills < scaled(10) or (
        kills < scaled(60)
        and not (outcomes["never installed"] and outcomes["installed, reply lost"])
    ):
        outcome = kill_mid_assign(
            broker, rng.randint(1, 4), rng.uniform(0, hi), sockdir / f"child-{kills}.log"
        )
        outcomes[outcome] += 1
        kills += 1
        # Aim at the boundary: later after a kill that came too early, earlier after one
        # that came after the reply.
        if outcome == "never installed":
            hi = min(10e-3, hi * 1.5)
        elif outcome == "installed, answered":
            hi = max(20e-6, hi / 1.5)
        assert_clean(broker, ctl, base)
    print(f"{kills} kills in {time.monotonic() - t0:.1f} s: {dict(outcomes)}")
    assert outcomes["never installed"] and outcomes["installed, reply lost"], outcomes


# ------------------------------------------------------------------ concurrent control operations

GSI_PRIMARY, GSI_SECONDARY = 0x20, 0x30  # per-client bases, as in KVM's test


class GuestServer:
    """One thread serving test-side guests: every detach is acknowledged at once."""

    def __init__(self, guests: list[GuestSide]) -> None:
        self.guests = guests
        self.stop_fd = new_eventfd()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="guests", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        by_fd = {g.peer.sock.fileno(): g for g in self.guests}
        try:
            while True:
                ready, _, _ = select.select([*by_fd, self.stop_fd.fileno()], [], [])
                if self.stop_fd.fileno() in ready:
                    return
                for fd in ready:
                    by_fd[fd].serve()
        except BaseException as e:  # handed to the test's thread by stop()
            self.error = e

    def stop(self) -> None:
        os.eventfd_write(self.stop_fd.fileno(), 1)
        self.thread.join(timing.scaled(10))
        assert not self.thread.is_alive(), "the guest thread hangs"
        self.stop_fd.close()
        if self.error is not None:
            raise self.error


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name.lower())
def test_irqfd_juggling_port_of_kvm_irqfd_test(
    broker_factory: Callable[..., BrokerHandle], policy: Policy
) -> None:
    """Create / assign / duplicate assign / deassign / close, while a second
    client juggles the same handle numbers on two VMs of its own."""
    broker = broker_factory(policy)
    rounds = scaled(1000)
    ctl = broker.connect()
    base = baseline(ctl)
    primary, secondary = Peer.connect(broker.path), Peer.connect(broker.path)
    guests: list[GuestSide] = []
    server: GuestServer | None = None
    published: queue.Queue[tuple[int, OwnedFd]] = queue.Queue(maxsize=64)
    done = threading.Event()
    p_answers: Counter[str] = Counter()
    s_answers: Counter[str] = Counter()
    s_error: list[BaseException] = []
    thread: threading.Thread | None = None
    p, s = primary.channel, secondary.channel
    try:
        vm1, vm2 = p.vm_create(ngsi=64), p.vm_create(ngsi=64)
        vm3, vm4 = s.vm_create(ngsi=64), s.vm_create(ngsi=64)
        guests = [
            GuestSide.attach(p, vm1),
            GuestSide.attach(p, vm2),
            GuestSide.attach(s, vm3),
            GuestSide.attach(s, vm4),
        ]
        server = GuestServer(guests)

        # KVM's prologue: one eventfd, one irqfd; a second binding is EBUSY (any gsi, any
        # VM, any client); deassigning pairs never assigned succeeds.
        h = p.eventfd_create()
        assert answer(p, vm1, h, 10) == "ok"
        assert answer(p, vm1, h, 11) == "EBUSY"
        assert answer(p, vm2, h, 12) == "EBUSY"
        with p.handle_fd(h) as fd:
            hs = s.eventfd_import(fd)
        assert answer(s, vm3, hs, 12) == "EBUSY"
        for gsi in (11, 12, 13, 14, 10):
            assert answer(p, vm1, h, gsi, DEASSIGN) == "ok"
        assert answer(s, vm3, hs, 12) == "ok"
        assert answer(s, vm3, hs, 12, DEASSIGN) == "ok"
        s.handle_close(hs)
        p.handle_close(h)
        current = [h]  # the primary's handle number now (closed: EBADF for the secondary)

        def juggle_secondary(vm: int, n: int) -> None:
            for i in (0, 1):
                r = answer(s, vm, n, GSI_SECONDARY)
                assert r in ("ok", "EBUSY", "EBADF"), r
                s_answers[f"assign {r}"] += 1
                r = answer(s, vm, n, GSI_SECONDARY + i, DEASSIGN)
                assert r in ("ok", "EBADF"), r  # a held handle can always deassign
                s_answers[f"deassign {r}"] += 1

        def secondary_juggler() -> None:
            held: int | None = None
            try:
                while not done.is_set():
                    while True:  # take every eventfd published so far, in order
                        try:
                            _, fd = published.get_nowait()
                        except queue.Empty:
                            break
                        with fd:
                            new = s.eventfd_import(fd)
                        if held is not None:
                            s.handle_close(held)  # may HUP a binding left on gsi+0
                        held = new
                        for vm in (vm3, vm4):  # what a closed handle can no longer name
                            assert answer(s, vm, wire.NO_HANDLE, GSI_SECONDARY, DEASSIGN) == "ok"
                    n = current[0]  # like KVM's READ_ONCE(__eventfd): may be stale
                    juggle_secondary(vm3, n)
                    juggle_secondary(vm4, n)
                if held is not None:
                    s.handle_close(held)
            except BaseException as e:  # re-raised by the test's thread
                s_error.append(e)
                done.set()

        def juggle_primary(vm: int, handle: int) -> None:
            r1 = answer(p, vm, handle, GSI_PRIMARY)
            assert r1 in ("ok", "EBUSY"), r1
            r2 = answer(p, vm, handle, GSI_PRIMARY + 1)
            assert r2 in ("ok", "EBUSY"), r2
            assert r1 != "ok" or r2 == "EBUSY", "one eventfd bound to two gsis"
            p_answers[f"first {r1}"] += 1
            p_answers[f"second {r2}"] += 1
            for gsi in (GSI_PRIMARY, GSI_PRIMARY + 1):  # Ok even if the assign failed
                assert answer(p, vm, handle, gsi, DEASSIGN) == "ok"

        thread = threading.Thread(target=secondary_juggler, name="secondary", daemon=True)
        thread.start()
        worst = 0.0
        t0 = time.monotonic()
        for i in range(rounds):
            if done.is_set():
                break
            h = p.eventfd_create()
            current[0] = h
            published.put((h, p.handle_fd(h)), timeout=timing.scaled(30))
            juggle_primary(vm1, h)
            juggle_primary(vm2, h)
            p.handle_close(h)
            if i % 25 == 0:
                worst = max(worst, ping(ctl, i))
                assert_counts_sane(ctl.state())
        done.set()
        thread.join(timing.scaled(30))
        assert not thread.is_alive(), "the secondary hangs"
        if s_error:
            raise s_error[0]
        elapsed = time.monotonic() - t0
        for vm in (vm1, vm2):
            p.vm_destroy(vm)
        for vm in (vm3, vm4):
            s.vm_destroy(vm)
        state = ctl.state()
        assert_counts_sane(state)
        assert not (state["objects"] or state["bindings"] or state["vms"]), state
        print(
            f"{rounds} rounds in {elapsed:.1f} s; primary {dict(p_answers)}; "
            f"secondary {dict(s_answers)}; worst ping {worst * 1e3:.1f} ms"
        )
        for want in ("assign ok", "assign EBUSY", "assign EBADF", "deassign EBADF"):
            assert s_answers[want], (want, s_answers)
        assert p_answers["first EBUSY"], "the secondary never held an eventfd the primary wanted"
    finally:
        done.set()
        if thread is not None:
            thread.join(timing.scaled(30))
        while not published.empty():
            published.get_nowait()[1].close()
        if server is not None:
            server.stop()
        for g in guests:
            g.close()
        primary.close()
        secondary.close()
    assert_clean(broker, ctl, base)


# ------------------------------------------------------------- signals around assign and deassign


def consumed(stats: dict[str, Any], gsi: int) -> int:
    """Signals the guest took from ``gsi``'s eventfds: injected, or drained at detach."""
    return int(stats["delivered"].get(str(gsi), 0)) + int(
        stats["drained_at_detach"].get(str(gsi), 0)
    )


def pending_count(fd: OwnedFd) -> int:
    try:
        return os.eventfd_read(fd.fileno())
    except BlockingIOError:
        return 0


@pytest.mark.timeout(120)
def test_signal_before_assign_is_one_interrupt_and_stays_pending(vmm: Vmm) -> None:
    """N signals pending at assign time -> one interrupt that reads nothing: the count
    stays in the eventfd until the next signal (which takes it all, with one more
    interrupt) or the deassign (which takes it without one)."""
    rng = rng_for("before-assign")
    ch = vmm.channel
    base = baseline(ch)
    vm = ch.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    expect: Counter[int] = Counter()
    wakeups: Counter[int] = Counter()
    for i in range(scaled(12)):
        gsi = 1 + i % 7
        signal_after = i % 2 == 1
        handle = ch.eventfd_create()
        n = rng.randint(1, 500)
        with ch.handle_fd(handle) as fd:
            for _ in range(n):
                os.eventfd_write(fd.fileno(), 1)
            before = guest.call("stats")
            binding = ch.irqfd_assign(vm, handle, gsi)
            guest.wait_event("irqfd_attached", binding=binding)  # reported after the injection
            stats = guest.call("stats")
            wakeups[gsi] += 1
            assert int(stats["wakeups"][str(gsi)]) == wakeups[gsi], (i, n, stats["wakeups"])
            assert stats["delivered"].get(str(gsi), 0) == before["delivered"].get(str(gsi), 0)
            info = eventfd_info(fd.fileno())
            assert info is not None and info.count == n  # injected, not read
            expect[gsi] += n
            if signal_after:
                os.eventfd_write(fd.fileno(), 1)
                expect[gsi] += 1
                total = int(before["delivered"].get(str(gsi), 0)) + n + 1
                assert guest.call("wait_total", gsi=gsi, total=total)["ok"]  # exactly that
                wakeups[gsi] += 1
                info = eventfd_info(fd.fileno())
                assert info is not None and info.count == 0
        ch.irqfd_deassign(vm, handle, gsi)
        ch.handle_close(handle)
        stats = guest.call("stats")
        assert int(stats["wakeups"][str(gsi)]) == wakeups[gsi]  # and no other one
        assert consumed(stats, gsi) == expect[gsi]  # read by a delivery or at detach
        (evt,) = [d for d in stats["detached"] if d["binding"] == binding]
        assert evt["drained"] == (0 if signal_after else n), evt
        ping(ch, i)
    ch.vm_destroy(vm)
    guest.wait_event("peer_gone", kind="vm")
    assert guest.proc.wait(timing.scaled(10)) == 0
    assert_clean(vmm.broker, ch, base)


def start_guest(vmm: Vmm, owner: Channel, vm: int, name: str) -> ManagedProcess:
    """A real guest process on ``owner``'s VM (logs checked by the vmm fixture)."""
    log = vmm.logdir / f"{name}.log"
    vmm.logs.append(log)
    with open(log, "w") as logf:
        proc = spawn_guest(owner.channel_open(wire.Scope.VM, vm), name, stderr=logf)
    vmm.procs.append(proc)
    proc.wait_event("attached", timeout=timing.scaled(10))
    return proc


@pytest.mark.timeout(120)
def test_signals_during_deassign_none_after_it_returns(vmm: Vmm) -> None:
    """A thread signals while the VMM deassigns; the guest has detached when
    the deassign returns, takes nothing after, and no signal is lost or counted twice.
    Every other round the guest is stopped (SIGSTOP) across the deassign: the broker must
    hold the answer until the guest, continued, has acknowledged."""
    ch = vmm.channel
    base = baseline(ch)
    owner = Peer.connect(vmm.broker.path)  # the VMM role, able to post without waiting
    rounds = scaled(12)
    after_return = during = 0
    try:
        vm = owner.channel.vm_create(ngsi=8)
        guest = start_guest(vmm, owner.channel, vm, "guest-4b")
        for i in range(rounds):
            gsi = 1 + i % 7
            stopped = i % 2 == 0
            handle = owner.channel.eventfd_create()
            binding = owner.channel.irqfd_assign(vm, handle, gsi)
            guest.wait_event("irqfd_attached", binding=binding)
            before = consumed(guest.call("stats"), gsi)
            with owner.channel.handle_fd(handle) as fd:
                sent = [0]
                stop = threading.Event()

                def signaller(
                    fd: OwnedFd = fd, sent: list[int] = sent, stop: threading.Event = stop
                ) -> None:
                    while not stop.is_set():
                        os.eventfd_write(fd.fileno(), 1)
                        sent[0] += 1

                thread = threading.Thread(target=signaller, name="signaller", daemon=True)
                thread.start()
                try:
                    deadline = timing.deadline(10)
                    while consumed(guest.call("stats"), gsi) == before:  # it is delivering
                        assert not timing.expired(deadline), "no interrupt while signaled"
                    if stopped:
                        os.kill(guest.pid, signal.SIGSTOP)
                    try:
                        at_start = sent[0]
                        seq = owner.post(wire.Irqfd(vm=vm, handle=handle, gsi=gsi, flags=DEASSIGN))
                        if stopped:  # whatever the broker did for it, it did before this
                            probe = owner.post(wire.Ping(token=i))
                            assert isinstance(owner.reply(probe), wire.Pong)
                            assert not owner.replied(seq), (
                                "deassign answered while the (stopped) guest held the irqfd"
                            )
                    finally:
                        if stopped:
                            os.kill(guest.pid, signal.SIGCONT)
                    assert isinstance(owner.reply(seq), wire.Ok)
                    at_return = sent[0]
                    stats = guest.call("stats")
                finally:
                    stop.set()
                    thread.join(timing.scaled(10))
                assert not thread.is_alive()
                during += at_return > at_start
                # The guest finished its detach before the broker answered the deassign.
                assert binding in [d["binding"] for d in stats["detached"]], stats["detached"]
                took = consumed(stats, gsi)
                late = 1000
                for _ in range(late):
                    os.eventfd_write(fd.fileno(), 1)
                final = guest.call("stats")
                assert consumed(final, gsi) == took, "the guest took signals after the deassign"
                left = pending_count(fd)
                assert left >= late
                assert (took - before) + left == sent[0] + late, (before, took, left, sent[0])
                after_return += left - late
            owner.channel.handle_close(handle)
            ping(ch, i)
        print(
            f"{rounds} rounds: signals written during the deassign in {during}; "
            f"{after_return} written after it returned, before the signaller stopped"
        )
        assert during, "the signaller never ran while a deassign was in flight"
        owner.channel.vm_destroy(vm)
        guest.wait_event("peer_gone", kind="vm")
        assert guest.proc.wait(timing.scaled(10)) == 0
    finally:
        owner.close()
    assert_clean(vmm.broker, ch, base)


# -------------------------------------------------------------------------------- a routing cycle

CYCLE_FANOUT = 2


@pytest.mark.timeout(180)
def test_routing_cycle_at_full_rate_stays_bounded(broker: BrokerHandle) -> None:
    """Doorbell -> device -> interrupt -> handler -> the same doorbell (twice)."""
    ctl = broker.connect()
    base = baseline(ctl)
    seconds = 2.0 * scale()
    spec = [
        {
            "name": "cyc",
            "devices": [{"model": "cycle", "name": "cyc0"}],
            "workload": [
                "--workload",
                "cycle",
                "--params",
                json.dumps({"seconds": seconds, "fanout": CYCLE_FANOUT}),
            ],
        }
    ]
    vmm = subprocess.Popen(
        python_module(
            "hostemu.vmm",
            "--socket",
            broker.path,
            "--spec",
            json.dumps(spec),
            "--timeout",
            str(seconds + timing.scaled(60)),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worst = 0.0
    try:
        while vmm.poll() is None:  # the broker is off the data path: it must stay snappy
            worst = max(worst, ping(ctl, 5))
            ctl.next_notice(0.05)  # paces the pings without sleeping blindly
        out, err = vmm.communicate(timeout=timing.scaled(30))
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.communicate(timeout=timing.scaled(10))
    assert "Traceback" not in err, err
    assert vmm.returncode == 0, (out, err)
    (done,) = [
        json.loads(line)
        for line in out.splitlines()
        if line.startswith("{") and '"vmm_done"' in line
    ]
    r = done["results"]["cyc"]
    dev = done["stats"]["cyc"]["devices"]["cyc0"]
    model, counters = dev["model"], dev["counters"]
    print(
        f"cycle: {r['interrupts']:,} interrupts ({r['interrupts_per_s']:,.0f}/s), "
        f"{r['doorbells']:,} doorbells, {model['passes']:,} device passes, largest drain "
        f"{r['max_signals']}, longest gap {r['max_gap_s'] * 1e3:.1f} ms, worst ping "
        f"{worst * 1e3:.1f} ms"
    )
    assert r["ok"], r
    # it ran (~50k/s on a quiet machine; the bound allows for a busy one)
    assert r["interrupts"] >= 500 * seconds / timing.TIME_SCALE, r
    assert r["max_gap_s"] < timing.scaled(1.0), r  # never stalled: no deadlock
    # Bounded queues: each turn doubles the signals, yet one drain never holds more than a
    # turn's worth, and the device never runs more passes than it was rung.
    assert r["max_signals"] <= 2 * CYCLE_FANOUT, r
    assert model["passes"] <= r["doorbells"] + 1, (model, r)  # +1: the pass at enable
    assert counters["interrupts"] == model["passes"], counters
    assert not counters.get("interrupts_unrouted"), counters
    assert r["signals"] <= model["passes"] <= r["signals"] + 2 * CYCLE_FANOUT, (model, r)
    # No recursion: neither handler re-entered, stack depths flat (the device's handler
    # is reached from a kick or from the scheduled pass at enable: one frame apart).
    assert r["reentered"] == 0 and r["depth_min"] == r["depth_max"], r
    assert model["reentered"] == 0 and model["depth_max"] - model["depth_min"] <= 1, model
    assert_clean(broker, ctl, base)


# ------------------------------------------------------------------ semaphore and counting irqfds


def detached_event(guest: ManagedProcess, binding: int) -> dict[str, Any]:
    return guest.wait_event("detached", binding=binding)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("teardown", ["deassign", "vm_destroy"])
def test_counters_at_teardown_semaphore_zero_and_coalesced_100000(vmm: Vmm, teardown: str) -> None:
    """A semaphore-mode irqfd at count 0 and a normal one signaled 100,000
    times (gsi masked) are drained at teardown: 0 without underflow, 100000 as one value."""
    ch = vmm.channel
    base = baseline(ch)
    vm = ch.vm_create(ngsi=8)
    guest = vmm.guest(vm)
    sem = ch.eventfd_create(semaphore=True)
    sem_binding = ch.irqfd_assign(vm, sem, 1)
    guest.wait_event("irqfd_attached", binding=sem_binding)
    norm = ch.eventfd_create()
    norm_binding = ch.irqfd_assign(vm, norm, 2)
    guest.wait_event("irqfd_attached", binding=norm_binding)
    guest.call("mask", gsi=2)
    with ch.handle_fd(norm) as fd:
        for _ in range(100_000):
            os.eventfd_write(fd.fileno(), 1)
    stats = guest.call("stats")
    assert consumed(stats, 2) == 0 and consumed(stats, 1) == 0, stats  # still pending
    if teardown == "deassign":
        ch.irqfd_deassign(vm, sem, 1)
        ch.irqfd_deassign(vm, norm, 2)
    else:
        ch.vm_destroy(vm)
    reason = "deassign" if teardown == "deassign" else "teardown"
    s_evt, n_evt = detached_event(guest, sem_binding), detached_event(guest, norm_binding)
    assert (s_evt["reason"], s_evt["gsi"], s_evt["drained"]) == (reason, 1, 0), s_evt
    assert (n_evt["reason"], n_evt["gsi"], n_evt["drained"]) == (reason, 2, 100_000), n_evt
    with ch.handle_fd(sem) as fd:
        assert pending_count(fd) == 0  # no underflow: still 0, and reading did not block
    with ch.handle_fd(norm) as fd:
        assert pending_count(fd) == 0  # the guest took all 100000 in one read
    objects = ch.state()["objects"]
    assert sorted((o["semaphore"], o["handles"], o["bindings"]) for o in objects) == [
        (False, 1, 0),
        (True, 1, 0),
    ], objects
    if teardown == "deassign":  # the guest is fine: a fresh irqfd still delivers
        guest.call("unmask", gsi=2)
        fresh = ch.eventfd_create()
        binding = ch.irqfd_assign(vm, fresh, 2)
        guest.wait_event("irqfd_attached", binding=binding)
        with ch.handle_fd(fresh) as fd:
            os.eventfd_write(fd.fileno(), 3)
        assert guest.call("wait_total", gsi=2, total=3)["delivered"] == 3
        ch.vm_destroy(vm)
        ch.handle_close(fresh)
    guest.wait_event("peer_gone", kind="vm")
    assert guest.proc.wait(timing.scaled(10)) == 0
    ch.handle_close(sem)
    ch.handle_close(norm)
    assert_clean(vmm.broker, ch, base)
