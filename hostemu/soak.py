"""``vbusemu soak --seconds N``: faults, churn and traffic at once; nothing lost, nothing leaked.

Theory of operation
-------------------
The soak runner is a launcher and a VMM in one process. It starts a broker in a private
directory and builds two VMs through an embedded :class:`~hostemu.vmm.Vmm`:

* ``net``: an echo device; the guest runs the ``soak`` workload in echo mode (a window of
  sequence-numbered, checksummed frames; duplicates from a restarted device dropped).
* ``disk``: a blk device on a sparse image; the guest runs the ``soak`` workload in blk
  mode (passes of generation-stamped writes, flush, read-back verify).

Both devices and both guests may be restarted any number of times (``restarts``,
``guest_restarts``). While the VMM serves exits, timers on its event loop:

* inject faults: SIGKILL, by pid, of a random guest or device process (exponential
  inter-arrival, mean ``--fault-every`` seconds; none in the last ``QUIET`` seconds so the
  final drain runs with everything up);
* churn the control plane on a separate connection: irqfd and ioeventfd assign/deassign
  on a VM of its own (every answer must be ok), and a ping whose latency is recorded.

At the end every guest drains and reports; the runner then checks the fault suite's oracles:
nothing lost (every echo frame of a guest that finished came back; every blk sector holds
an intact generation at least the last acknowledged one); nothing leaked (the broker's
table is empty and its open-fd count back to the baseline before the VMs existed;
``/dev/shm`` gained nothing; no child process is left); no traceback in any log; the broker
exits 0; the broker answered every ping within a second. The report says how many
operations were done and faults injected, what was sent / acknowledged / received, and
what was lost or leaked; the exit status is 0 only if both are 0 and every check passed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np

from guestemu.workloads.soak import image_generations
from hostemu.launcher import ManagedProcess, start_broker
from hostemu.vmm import DeviceSpec, Vmm, VmSpec
from shared.channel import Channel
from shared.errors import VbusError
from shared.loop import EventLoop
from shared.wire import Policy

QUIET: Final = 4.0
"""No fault is injected in the last seconds: the final drain runs with everything up."""
FOREVER: Final = 1_000_000
"""Restarts allowed for each guest and device during a soak (bounded only by time)."""
BLK_COUNT: Final = 16
BLK_SECTORS: Final = 8
BLK_START: Final = 0
CHURN_EVERY: Final = 0.05
CHURN_BURST: Final = 8


@dataclass
class Tally:
    """What one soak observed; :meth:`lost` and :meth:`leaks` must both be empty."""

    seconds: float
    faults: Counter[str] = field(default_factory=Counter)
    churn_ops: int = 0
    churn_errors: list[str] = field(default_factory=list)
    worst_ping: float = 0.0
    echo: dict[int, dict[str, Any]] = field(default_factory=dict)  # guest pid -> progress
    echo_final: dict[str, Any] = field(default_factory=dict)
    blk_acked: int = 0
    blk_passes: int = 0
    blk_final: dict[str, Any] = field(default_factory=dict)
    restarts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    lost: int = 0

    def totals(self) -> dict[str, int]:
        keys = ("sent", "acked", "received", "duplicates")
        return {k: sum(int(p.get(k, 0)) for p in self.echo.values()) for k in keys}


class Soak:
    def __init__(
        self,
        seconds: float,
        *,
        seed: int,
        fault_every: float,
        workdir: Path,
        log: TextIO,
        out: TextIO,
    ) -> None:
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.fault_every = fault_every
        self.workdir = workdir
        self.log = log
        self.out = out
        self.tally = Tally(seconds)
        self.loop = EventLoop()
        self.end = 0.0  # monotonic
        self.image = workdir / "disk.img"
        self.killed: set[int] = set()

    # ------------------------------------------------------------------ events

    def on_event(self, ev: dict[str, Any]) -> None:
        t = self.tally
        name = ev.get("name") if ev.get("event") == "guest_event" else ev.get("event")
        if name == "soak_progress":
            t.echo[int(ev.get("guest_pid", 0))] = ev
        elif name == "blk_pass":
            t.blk_passes += 1
            t.blk_acked = max(t.blk_acked, int(ev["generation"]))
        elif name in ("device_restarted", "guest_restarted"):
            t.restarts[name] += 1

    # ------------------------------------------------------------------ faults and churn

    def victims(self, vmm: Vmm) -> list[tuple[str, ManagedProcess]]:
        """Live guest and device processes not already shot (a killed one may not have
        been reaped yet: it would be counted twice)."""
        out: list[tuple[str, ManagedProcess]] = []
        for vm in vmm.vms.values():
            procs = [(f"guest:{vm.spec.name}", vm.guest)]
            procs += [
                (f"device:{vm.spec.name}/{d.spec.name}", d.process) for d in vm.devices.values()
            ]
            out += [
                (what, p)
                for what, p in procs
                if p is not None and p.alive and p.pid not in self.killed
            ]
        return out

    def schedule_fault(self, vmm: Vmm) -> None:
        when = time.monotonic() + self.rng.expovariate(1.0 / self.fault_every)
        if when < self.end - QUIET:
            self.loop.call_at(when, lambda: self.inject(vmm))

    def inject(self, vmm: Vmm) -> None:
        candidates = self.victims(vmm)
        if candidates:
            what, proc = self.rng.choice(candidates)
            # By pid, and only a child we started that has not been reaped: the pid
            # cannot have been reused by anyone else.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            self.killed.add(proc.pid)
            self.tally.faults[what.split(":")[0]] += 1
        self.schedule_fault(vmm)

    def churn(self, ch: Channel, vm: int, handles: list[int]) -> None:
        t = self.tally
        try:
            for i in range(CHURN_BURST):
                h = handles[i % len(handles)]
                gsi = 1 + self.rng.randrange(15)
                addr = 0x1000 + 8 * self.rng.randrange(64)
                ch.irqfd_assign(vm, h, gsi)
                ch.ioeventfd(vm, h, addr, 4, datamatch=i)
                ch.ioeventfd(vm, h, addr, 4, datamatch=i, deassign=True)
                ch.irqfd_deassign(vm, h, gsi)
                t.churn_ops += 4
            t0 = time.monotonic()
            ch.ping(t.churn_ops & 0xFFFF, timeout=5)
            t.worst_ping = max(t.worst_ping, time.monotonic() - t0)
        except VbusError as e:
            t.churn_errors.append(f"{type(e).__name__}: {e}")
        if time.monotonic() < self.end and len(t.churn_errors) < 10:
            self.loop.call_at(time.monotonic() + CHURN_EVERY, lambda: self.churn(ch, vm, handles))

    # ------------------------------------------------------------------ the run

    def specs(self, until: float) -> list[VmSpec]:
        def workload(params: dict[str, Any]) -> tuple[str, ...]:
            return ("--workload", "soak", "--params", json.dumps({**params, "until": until}))

        return [
            VmSpec(
                name="net",
                devices=(DeviceSpec("echo", "echo0", restarts=FOREVER),),
                workload=workload({"mode": "echo"}),
                guest_restarts=FOREVER,
            ),
            VmSpec(
                name="disk",
                devices=(
                    DeviceSpec(
                        "blk",
                        "disk0",
                        {"image": str(self.image), "capacity": 4096},
                        restarts=FOREVER,
                    ),
                ),
                workload=workload(
                    {"mode": "blk", "count": BLK_COUNT, "sectors": BLK_SECTORS, "start": BLK_START}
                ),
                guest_restarts=FOREVER,
            ),
        ]

    def run(self, socket_path: str, broker: ManagedProcess) -> None:
        t = self.tally
        with Channel.connect(socket_path) as ctl:
            baseline = ctl.state()["process"]["open_fds"]  # before anything else exists
            vmm_ch = Channel.connect(socket_path)
            churn_ch = Channel.connect(socket_path)
            vmm = Vmm(vmm_ch, stderr=self.log)
            vmm.on_event = self.on_event  # type: ignore[assignment]
            self.end = time.monotonic() + self.seconds
            until = time.time() + self.seconds
            churn_vm = churn_ch.vm_create(16)
            handles = [churn_ch.eventfd_create() for _ in range(4)]
            try:
                for spec in self.specs(until):
                    vmm.create_vm(spec)
                vmm.start()
                self.schedule_fault(vmm)
                self.loop.call_at(time.monotonic(), lambda: self.churn(churn_ch, churn_vm, handles))
                results = vmm.run_until_guests_exit(self.loop, self.seconds + 120)
                t.problems.extend(vmm.errors)
                last_net = next(
                    (
                        vm.guest.pid
                        for vm in vmm.vms.values()
                        if vm.spec.name == "net" and vm.guest is not None
                    ),
                    0,
                )
                self.collect(results, last_net)
            finally:
                vmm.shutdown()
                with contextlib.suppress(VbusError):
                    churn_ch.vm_destroy(churn_vm)
                    for h in handles:
                        churn_ch.handle_close(h)
            churn_ch.close()
            vmm_ch.close()
            state = ctl.state()
            for key in ("objects", "vms", "devices", "bindings"):
                if state[key]:
                    t.leaks.append(f"broker table still holds {key}: {state[key]}")
            if len(state["connections"]) != 1:
                t.leaks.append(f"broker still has {len(state['connections'])} connections")
            if state["process"]["open_fds"] != baseline:
                t.leaks.append(
                    f"broker open fds {state['process']['open_fds']}, baseline {baseline}"
                )

    def collect(self, results: dict[str, Any], last_net_pid: int) -> None:
        t = self.tally
        for name in ("net", "disk"):
            if name not in results:
                t.problems.append(f"{name}: its guest never reported a result")
        for name, r in results.items():
            if not r.get("ok"):
                t.problems.append(f"{name}: {r.get('error')}")
        net = results.get("net", {})
        t.echo_final = net
        if net and not net.get("sent"):
            t.problems.append("net: the final echo guest sent nothing")
        if net:
            t.echo[last_net_pid] = net  # the last incarnation's final counts
            t.lost += int(net.get("lost") or 0)
        t.blk_final = results.get("disk", {})
        if t.churn_errors:
            t.problems.extend(f"churn: {e}" for e in t.churn_errors[:5])
        if t.worst_ping > 1.0:
            t.problems.append(f"the broker took {t.worst_ping:.2f} s to answer a ping")

    def check_image(self) -> None:
        """Every sector holds an intact generation, at least the last acknowledged one."""
        t = self.tally
        nbytes = BLK_COUNT * BLK_SECTORS * 512
        with open(self.image, "rb") as f:
            f.seek(BLK_START * 512)
            data = np.frombuffer(f.read(nbytes), dtype=np.uint8).copy()
        if data.shape[0] < nbytes:
            data = np.concatenate([data, np.zeros(nbytes - data.shape[0], np.uint8)])
        gens = image_generations(data, BLK_START)
        torn = int((gens < 0).sum())
        stale = int((gens[gens >= 0] < t.blk_acked).sum())
        if torn:
            t.problems.append(f"{torn} sectors of the image hold no intact generation")
        t.lost += stale  # an acknowledged write that is not on disk
        if stale:
            t.problems.append(f"{stale} sectors older than acknowledged generation {t.blk_acked}")

    def report(self) -> str:
        t = self.tally
        tot = t.totals()
        lines = [
            f"soak: {t.seconds:.0f} s",
            f"  operations    churn assign/deassign {t.churn_ops:,}; echo frames "
            f"{tot['sent']:,}; blk passes {t.blk_passes:,}",
            f"  faults        {dict(t.faults) or 'none'} injected; restarts {dict(t.restarts)}",
            f"  messages      sent {tot['sent']:,}  acknowledged {tot['acked']:,}  "
            f"received {tot['received']:,}  duplicates dropped {tot['duplicates']:,}",
            f"  blk           generations acknowledged up to {t.blk_acked}",
            f"  last guests   net: sent {t.echo_final.get('sent')} received "
            f"{t.echo_final.get('received')} lost {t.echo_final.get('lost')}; disk: passes "
            f"{t.blk_final.get('passes')} generation {t.blk_final.get('generation')}",
            f"  worst ping    {t.worst_ping * 1e3:.1f} ms",
            f"  lost          {t.lost}",
            f"  leaks         {len(t.leaks)}",
        ]
        lines += [f"    leak: {x}" for x in t.leaks]
        lines += [f"    problem: {x}" for x in t.problems]
        ok = not t.lost and not t.leaks and not t.problems
        lines.append(f"soak: {'PASSED' if ok else 'FAILED'}")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        t = self.tally
        return not t.lost and not t.leaks and not t.problems


def children_of_me() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    kids.add(int(name))
    return kids


def main(
    seconds: float = 60.0,
    *,
    seed: int | None = None,
    fault_every: float = 1.0,
    out: TextIO = sys.stdout,
) -> int:
    seed = random.randrange(1 << 32) if seed is None else seed
    shm_before = set(os.listdir("/dev/shm"))
    kids_before = children_of_me()
    workdir = Path(tempfile.mkdtemp(prefix="vbsoak-"))
    keep = False  # a failed soak keeps its logs and image; anything else leaves nothing
    try:
        run_dir = workdir / "run"
        run_dir.mkdir(mode=0o700)
        log_path = workdir / "soak.log"
        print(
            f"soak: {seconds:.0f} s, seed {seed}, a fault every {fault_every} s on average; "
            f"logs in {log_path}",
            file=out,
            flush=True,
        )
        with open(log_path, "w") as log:
            # The embedded VMM logs (restarts, deferred configurations) go to the log file.
            handler = logging.StreamHandler(log)
            handler.setFormatter(logging.Formatter("soak-vmm: %(levelname)s %(message)s"))
            logging.getLogger("vbusemu").addHandler(handler)
            logging.getLogger("vbusemu").propagate = False
            broker = start_broker(
                str(run_dir / "broker.sock"), Policy.REFCOUNT, stderr=log, stdout=log
            )
            soak = Soak(
                seconds, seed=seed, fault_every=fault_every, workdir=workdir, log=log, out=out
            )
            try:
                soak.run(str(run_dir / "broker.sock"), broker)
            except VbusError as e:
                soak.tally.problems.append(f"{type(e).__name__}: {e}")
            finally:
                status = broker.stop()
                soak.loop.close()
            if status != 0:
                soak.tally.problems.append(f"the broker exited with status {status}")
        soak.check_image()
        if "Traceback" in log_path.read_text(errors="replace"):
            soak.tally.problems.append(f"a traceback in the logs (see {log_path})")
        for entry in sorted(set(os.listdir("/dev/shm")) - shm_before):
            soak.tally.leaks.append(f"/dev/shm/{entry}")
        for pid in sorted(children_of_me() - kids_before):
            soak.tally.leaks.append(f"process {pid} left running (killed)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        print(soak.report(), file=out, flush=True)
        if soak.ok:
            return 0
        keep = True
        print(f"soak: logs and image kept in {workdir}", file=out, flush=True)
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
