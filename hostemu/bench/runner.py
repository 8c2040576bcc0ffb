"""``vbusemu bench``: vbusemu's data path measured next to its baselines, in one run.

Theory of operation
-------------------
One broker (release policy ``refcount``) serves the whole run. Each vbusemu figure comes
from a real VMM run (``python -m hostemu.vmm``) whose guests push frames through the full
emulated path -- guest driver -> split ring in shared memory -> ioeventfd doorbell -> echo
device process -> used ring -> irqfd interrupt -> guest -- and report what they measured
themselves (:mod:`guestemu.workloads.echo`). The control-plane figures come from a client
talking to the broker directly. Baselines (:mod:`hostemu.bench.baselines`) run in the same
process tree, same sizes, same run, between the vbusemu measurements.

Data paths: the run's own path is ``VBUSEMU_JIT``'s (the numba kernels by default); the
kernel cache is warmed once before anything is measured. With the kernels, the 64 B
small messages at batch 1 and 256 and the 8-VM scale run are measured again with
``VBUSEMU_JIT=0`` for every measured process (the numpy reference); every row says which
path produced it. Start-up rows time the default job (``vbusemu run`` of
``examples/two-vms.toml``, copied into a private directory) and the kernels' compile into
an empty numba cache; memory rows read the processes' RSS and Pss while the two-VM job
and the 1- and 8-VM scale runs are under way (:mod:`hostemu.bench.procmem`).

Every figure is the median of ``reps`` repetitions (min and max kept; quick mode too), and
one whose spread exceeds 25 % is marked noisy. A row's ``ratio`` is oriented so that > 1
means vbusemu is better: value / baseline for throughputs, baseline / value for latencies.
The benchmark asserts nothing; the targets are evaluated and reported as met or missed,
a missed one with where its time goes (:mod:`hostemu.bench.report`).

Comparability (docs/performance.md explains each): a small-message batch means messages
per notification on both sides, with the same window of messages in flight
(:func:`small_window`); small messages and bulk go one way, guest -> device (the echo
device's ``sink``); round trips are measured per CPU placement with vbusemu's guest and
device pinned exactly as the baseline's two processes (:func:`placements`); the
control-plane binding counts are measured interleaved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostemu.bench import baselines, procmem
from hostemu.bench.report import (
    KERNELS,
    REFERENCE,
    TARGETS,
    Row,
    console,
    evaluate,
    fmt_size,
    header_lines,
    markdown,
    row_from_reps,
    summary,
)
from hostemu.launcher import ManagedProcess, python_module, start_broker, warm_kernels
from shared.channel import Channel
from shared.errors import ConfigError, VbusError
from shared.jit import JIT_ENV, jit_enabled
from shared.wire import Policy

SMALL_RING = 1024
"""Small messages: vbusemu's TX ring size -- at most this many frames in flight."""
SMALL_ACKS = 256
"""...and at most this many acks outstanding for a baseline: the sockets' default buffers
hold that many small messages; with many more a sender blocked on a full socket, its own
acks unread, deadlocks with its receiver blocked sending it acks."""


def small_window(batch: int) -> int:
    """Messages in flight at most, the same for vbusemu (its ring holds this many) and for
    every baseline (sent and not yet acknowledged): the ring, or fewer for small batches
    so a baseline's acks fit in its socket buffers."""
    return min(SMALL_RING, SMALL_ACKS * batch)


SMALL_KINDS = {
    "pipe": "multiprocessing.Pipe",
    "queue": "multiprocessing.Queue",
    "socketpair": "socketpair(SEQPACKET)",
}
CP_CHUNK = 20
"""Control plane: operations per binding count in each interleaved round."""
POLL_WINDOW_NS = 2_000_000
"""Round trip "polling": the guest's halt-poll and the device's busy-poll window."""
MODES = {  # notification mode -> (echo notify param, guest halt-poll ns)
    "notify-always": ("always", 0),
    "event-idx": ("event_idx", 0),
    "adaptive-poll": ("event_idx", -1),
}
REFERENCE_BATCHES = (1, 256)
"""Small messages measured on the reference path too (event-idx): the scalar fast path
(batch 1) and the kernels' case (batch 256)."""
TWO_VMS = Path(__file__).resolve().parent.parent / "examples" / "two-vms.toml"
TWO_VMS_KINDS = {
    "launcher": 1,
    "broker": 1,
    "vmm": 1,
    "guest": 2,
    "venet device": 1,
    "blk device": 2,
    "console device": 2,
}
"""The processes of the two-VM job; memory is read while all of them are alive."""
MEMORY_VMS = 8


@dataclass
class Plan:
    """What a run measures. The full run measures everything; the quick one (as many
    repetitions) the figures every target reads plus the path, start-up and memory rows:
    one notification mode (event-idx), the cross-CPU placement (the targets'), bulk one
    way only, and 1, 4 and 8 VMs."""

    quick: bool
    reps: int
    seconds: float  # per baseline measurement
    counts: dict[str, int] = field(default_factory=dict)
    modes: tuple[str, ...] = tuple(MODES)
    placements: tuple[str, ...] = ("any", "same-cpu", "cross-cpu")
    bulk_echo: bool = True
    scale_vms: tuple[int, ...] = (1, 2, 4, 8)
    memory_vms: int = MEMORY_VMS  # the scale run measured on both paths, memory sampled

    def shrunk(self, factor: float) -> Plan:
        """The same plan with every count (and baseline time) scaled by ``factor`` <= 1,
        and at most 4 VMs at once: what the output-format smoke test runs, where no figure
        matters (each of 8 VMs' 16 processes loading the kernels costs most of a minute
        on 2 CPUs)."""
        if factor == 1.0:
            return self
        counts = {k: max(1, int(v * factor)) for k, v in self.counts.items()}
        return dataclasses.replace(
            self,
            seconds=self.seconds * factor,
            counts=counts,
            scale_vms=tuple(n for n in self.scale_vms if n <= 4),
            memory_vms=4,
        )

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                True,
                3,
                0.2,
                {
                    "small1": 50000,
                    "small": 1000000,
                    "rtt": 300,
                    "bulk64k": 4000,
                    "bulk1m": 600,
                    "scale": 1200000,
                    "ops": 200,
                },
                modes=("event-idx",),
                placements=("cross-cpu",),
                bulk_echo=False,
                scale_vms=(1, 4, 8),
            )
        return cls(
            False,
            3,
            1.0,
            {
                "small1": 100000,
                "small": 2000000,
                "rtt": 2000,
                "bulk64k": 30000,
                "bulk1m": 3000,
                "scale": 4000000,
                "ops": 1000,
            },
        )


class BenchError(VbusError):
    """A measurement could not be taken (its processes failed); the run stops."""


def placements() -> dict[str, tuple[int, int] | None]:
    """Where the two ends of a round trip run: unpinned, and -- with two usable CPUs --
    both on one CPU and on two."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, tuple[int, int] | None] = {"any": None}
    if len(cpus) > 1:
        out["same-cpu"] = (cpus[0], cpus[0])
        out["cross-cpu"] = (cpus[0], cpus[1])
    return out


def path_env(path: str) -> dict[str, str]:
    """The environment of a run on ``path``: ``VBUSEMU_JIT`` set for every process."""
    return {**os.environ, JIT_ENV: "1" if path == KERNELS else "0"}


def _doorbells(result: dict[str, Any]) -> float:
    return float(result["doorbells"])


def _interrupts(result: dict[str, Any]) -> float:
    return float(sum(result["interrupts"].values()))


def _percentiles(rtts: list[float]) -> dict[str, float]:
    """p50 and p99 of round-trip times in seconds, in microseconds."""
    ordered = sorted(rtts)
    return {
        "p50": statistics.median(ordered) * 1e6,
        "p99": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1e6,
    }


MIB = 1024.0  # KiB per MiB


class Bench:
    def __init__(
        self,
        plan: Plan,
        sock: str,
        say: Callable[[str], None],
        broker_pid: int | None = None,
        path: str = KERNELS,
    ) -> None:
        self.plan = plan
        self.sock = sock
        self.say = say
        self.broker_pid = broker_pid
        self.path = path  # the run's own data path (VBUSEMU_JIT)
        self.rows: list[Row] = []
        # round-trip times in us for the distribution plot: placement -> series -> samples
        self.rtt_samples: dict[str, dict[str, list[float]]] = {}

    @property
    def paths(self) -> tuple[str, ...]:
        """The run's path and, when that is the kernels, the reference too."""
        return (KERNELS, REFERENCE) if self.path == KERNELS else (self.path,)

    # ------------------------------------------------------------------ vbusemu runs

    def run_vms(
        self,
        vms: list[dict[str, Any]],
        timeout: float = 120,
        path: str | None = None,
        memory: dict[str, int] | None = None,
        start_together: bool = False,
    ) -> dict[str, Any]:
        """One VMM run of ``vms``; with ``memory`` (the expected process kinds) the
        processes' memory is sampled meanwhile, returned under ``"memory"``; with
        ``start_together`` every guest's workload waits, once booted, for all the others
        (the VMM's ``--start-together``)."""
        proc = subprocess.Popen(
            python_module(
                "hostemu.vmm",
                "--socket",
                self.sock,
                "--spec",
                json.dumps(vms),
                "--timeout",
                str(timeout),
                *(["--start-together"] if start_together else []),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=path_env(path or self.path),
        )
        sampler = procmem.TreeSampler(
            proc.pid, memory or {}, [self.broker_pid] if self.broker_pid else []
        )
        try:
            if memory is not None:
                with sampler:
                    stdout, stderr = proc.communicate(timeout=timeout + 60)
            else:
                stdout, stderr = proc.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"VMM run did not finish in {timeout + 60:.0f} s") from None
        done = [
            json.loads(line)
            for line in stdout.splitlines()
            if line.startswith('{"event": "vmm_done"')
        ]
        if not done or proc.returncode != 0:
            raise BenchError(f"VMM run failed ({proc.returncode}): {stdout[-800:]} {stderr[-800:]}")
        result: dict[str, Any] = done[-1]
        if memory is not None:
            result["memory"] = sampler.result()
        return result

    @staticmethod
    def echo_vm(
        name: str,
        params: dict[str, Any],
        halt_poll_ns: int = -1,
        memory: int = 32 << 20,
        device: dict[str, Any] | None = None,
        cpus: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """One VM with an echo device; ``cpus``: (guest CPU, device CPU) to pin them."""
        echo: dict[str, Any] = {"model": "echo", "name": "echo0", "params": device or {}}
        if int(params.get("qsize", 256)) > 256:
            echo["queue_size_max"] = int(params["qsize"])
        vm: dict[str, Any] = {}
        if cpus is not None:
            vm["cpus"], echo["cpus"] = [cpus[0]], [cpus[1]]
        return {
            "name": name,
            "memory": memory,
            "devices": [echo],
            **vm,
            "workload": [
                "--workload",
                "echo",
                "--params",
                json.dumps(params),
                "--halt-poll-ns",
                str(halt_poll_ns),
            ],
        }

    def echo_metric(
        self,
        params: dict[str, Any],
        halt_poll_ns: int,
        metric: str,
        scale: float = 1.0,
        memory: int = 32 << 20,
        device: dict[str, Any] | None = None,
    ) -> float:
        return float(self.echo(params, halt_poll_ns, memory, device)[metric]) * scale

    def echo(
        self,
        params: dict[str, Any],
        halt_poll_ns: int = -1,
        memory: int = 32 << 20,
        device: dict[str, Any] | None = None,
        cpus: tuple[int, int] | None = None,
        path: str | None = None,
    ) -> dict[str, Any]:
        result = self.run_vms(
            [self.echo_vm("vm0", params, halt_poll_ns, memory, device, cpus)], path=path
        )
        r: dict[str, Any] = result["results"]["vm0"]
        if not r.get("ok"):
            raise BenchError(f"echo workload failed: {r.get('error')}")
        if params.get("sink"):  # one way: the device's own count and sequence check
            model = (
                result.get("stats", {})
                .get("vm0", {})
                .get("devices", {})
                .get("echo0", {})
                .get("model", {})
            )
            if model.get("sunk") != r["frames"] or model.get("seq_errors") != 0:
                raise BenchError(
                    f"sink device saw {model.get('sunk')} frames "
                    f"({model.get('seq_errors')} out of sequence), the guest "
                    f"sent {r['frames']}"
                )
        return r

    # ------------------------------------------------------------------ bookkeeping

    def values(self, fn: Callable[[], float]) -> list[float]:
        return [fn() for _ in range(self.plan.reps)]

    def add(self, row: Row) -> Row:
        self.rows.append(row.finish())
        return row

    def add_reps(
        self,
        workload: str,
        params: dict[str, Any],
        metric: str,
        values: list[float],
        unit: str,
        **kw: Any,
    ) -> Row:
        row = row_from_reps(workload, params, metric, values, unit, **kw)
        self.rows.append(row)
        return row

    # ------------------------------------------------------------------ workloads

    def small_messages(self) -> None:
        """64 B guest -> host at batch 1, 16, 256, three notify modes, against every
        message-passing baseline; the same window (frames in flight) everywhere. Batches
        1 and 256 (event-idx) are measured on the reference path too."""
        for batch in (1, 16, 256):
            measured = {}
            for kind in SMALL_KINDS:
                vals = self.values(
                    functools.partial(
                        baselines.small_messages,
                        kind,
                        64,
                        batch,
                        self.plan.seconds,
                        small_window(batch),
                    )
                )
                measured[kind] = statistics.median(vals)
                self.add_reps(
                    "baseline",
                    {"kind": kind, "payload": 64, "batch": batch, "window": small_window(batch)},
                    "msgs/s",
                    vals,
                    "msgs/s",
                )
            cases = [(mode, self.path) for mode in self.plan.modes]
            if batch in REFERENCE_BATCHES and self.path == KERNELS:
                cases.append(("event-idx", REFERENCE))
            for mode, path in cases:
                notify, halt = MODES[mode]
                # batch 1 at ~150k msgs/s (a doorbell per message, or the reference path)
                # runs fewer frames than the millions a second of the kernels' steps
                slow = batch == 1 and (path == REFERENCE or mode == "notify-always")
                params = {
                    "count": self.plan.counts["small1" if slow else "small"],
                    "size": 64,
                    "batch": batch,
                    "notify": notify,
                    "sink": True,
                    "qsize": small_window(batch),
                }
                runs = [
                    self.echo(params, halt, device={"sink": True}, path=path)
                    for _ in range(self.plan.reps)
                ]
                row = {"payload": 64, "batch": batch, "mode": mode, "window": small_window(batch)}
                self.add_reps(
                    "small-messages",
                    row,
                    "msgs/s",
                    [float(r["frames_per_s"]) for r in runs],
                    "msgs/s",
                    path=path,
                    baseline="Pipe",
                    baseline_value=measured["pipe"],
                )
                # what notification suppression bought: doorbells the guest rang and
                # interrupts it took, per message (a socket pays a syscall per message)
                for metric, count_of in (
                    ("doorbells/msg", _doorbells),
                    ("interrupts/msg", _interrupts),
                ):
                    self.add_reps(
                        "small-messages",
                        row,
                        metric,
                        [count_of(r) / max(1, int(r["frames"])) for r in runs],
                        "per msg",
                        path=path,
                    )

    def round_trip(self) -> None:
        """Stop-and-wait 64 B round trips, sleeping and polling, next to the raw eventfd
        ping-pong, in each placement: unpinned (the kernel chooses, and an unpinned pair
        flips between the two costs below at its whim), both processes on one CPU (a
        wakeup is a context switch) and on two CPUs (a cross-CPU wakeup). vbusemu's guest
        and device process are pinned exactly as the ping-pong's two processes are."""
        samples = self.plan.counts["rtt"]
        pipe = [
            _percentiles(baselines.round_trip("pipe", 64, samples)) for _ in range(self.plan.reps)
        ]
        for q in ("p50", "p99"):
            self.add_reps(
                "baseline",
                {"kind": "pipe", "placement": "any"},
                f"rtt_{q}",
                [p[q] for p in pipe],
                "us",
            )
        places = placements()
        chosen = {k: v for k, v in places.items() if k in self.plan.placements} or {
            "any": places["any"]
        }  # one CPU: only the unpinned placement exists
        for placement, cpus in chosen.items():
            runs = [
                baselines.round_trip("eventfd", 64, samples, cpus=cpus)
                for _ in range(self.plan.reps)
            ]
            base = [_percentiles(rtts) for rtts in runs]
            series = self.rtt_samples[placement] = {
                "eventfd ping-pong": [x * 1e6 for rtts in runs for x in rtts]
            }
            medians = {}
            for q in ("p50", "p99"):
                medians[q] = self.add_reps(
                    "baseline",
                    {"kind": "eventfd-pingpong", "placement": placement},
                    f"rtt_{q}",
                    [b[q] for b in base],
                    "us",
                ).value
            # polling: the guest's vCPU halt-polls and the device busy-polls its TX ring
            # (vhost's busyloop), both for up to POLL_WINDOW_NS after the last event;
            # sleeping: neither.
            for mode, halt, device in (
                ("sleeping", 0, {}),
                ("polling", POLL_WINDOW_NS, {"busy_poll_us": POLL_WINDOW_NS // 1000}),
            ):
                reps = [
                    self.echo(
                        {"count": samples, "size": 64, "batch": 1, "window": 1},
                        halt,
                        device=device,
                        cpus=cpus,
                    )
                    for _ in range(self.plan.reps)
                ]
                series[f"vbusemu {mode}"] = [x for r in reps for x in r.get("rtt_us", [])]
                for q in ("p50", "p99"):
                    self.add_reps(
                        "round-trip",
                        {"payload": 64, "mode": mode, "placement": placement},
                        f"rtt_{q}",
                        [float(r[f"rtt_{q}_us"]) for r in reps],
                        "us",
                        path=self.path,
                        baseline="eventfd ping-pong",
                        baseline_value=medians[q],
                    )

    def bulk(self) -> None:
        for size, key in ((64 << 10, "bulk64k"), (1 << 20, "bulk1m")):
            measured = {}
            for kind in ("pipe", "socketpair", "numpy-copy"):
                vals = self.values(functools.partial(baselines.bulk, kind, size, self.plan.seconds))
                measured[kind] = self.add_reps(
                    "baseline", {"kind": kind, "size": size}, "bytes/s", vals, "B/s"
                ).value
            # guest -> host: the device copies each buffer into its own memory (and checks
            # the sequence numbers), as the Pipe receiver gets each buffer as its own bytes
            params = {
                "count": self.plan.counts[key],
                "size": size,
                "batch": 8,
                "qsize": 16,
                "sink": True,
            }
            vals = self.values(
                functools.partial(
                    self.echo_metric, params, -1, "mb_per_s", 1e6, 64 << 20, {"sink": True}
                )
            )
            self.add_reps(
                "bulk",
                {"size": size},
                "bytes/s",
                vals,
                "B/s",
                path=self.path,
                baseline="Pipe",
                baseline_value=measured["pipe"],
                note=f"two-copy bound {measured['numpy-copy'] / 2 / 1e9:.3g} GB/s",
            )
            if not self.plan.bulk_echo:
                continue
            # and back (echo): every byte copied into an RX buffer and verified by the guest
            params = {"count": self.plan.counts[key] // 4, "size": size, "batch": 8, "qsize": 16}
            vals = self.values(
                functools.partial(self.echo_metric, params, -1, "mb_per_s", 1e6, 64 << 20)
            )
            self.add_reps(
                "bulk-echo",
                {"size": size},
                "bytes/s",
                vals,
                "B/s",
                path=self.path,
                baseline="Pipe",
                baseline_value=measured["pipe"],
            )

    def control_plane(self) -> None:
        """ioeventfd assign+deassign latency with 10, 1,000 and 10,000 live bindings.

        The three VMs (one per binding count) live side by side and are measured in
        interleaved rounds of ``CP_CHUNK`` operations, so whatever the machine does
        meanwhile (CPU placement of client and broker, other load) falls on all three
        alike; measured one after the other they differed by 2x from placement alone.
        Each repetition is a full set of rounds over the same VMs."""
        ops = self.plan.counts["ops"]
        counts = (10, 1000, 10000)
        lat_reps: dict[int, list[float]] = {live: [] for live in counts}
        rate_reps: dict[int, list[float]] = {live: [] for live in counts}
        with Channel.connect(self.sock) as ch:
            vms: dict[int, tuple[int, int]] = {}
            for live in counts:
                vm, handle = ch.vm_create(8), ch.eventfd_create()
                vms[live] = (vm, handle)
                for i in range(live):
                    ch.ioeventfd(vm, handle, 0x1000_0000 + 8 * i, 4)
            for _ in range(self.plan.reps):
                lats: dict[int, list[float]] = {live: [] for live in counts}
                spent: dict[int, float] = dict.fromkeys(counts, 0.0)
                for first in range(0, ops, CP_CHUNK):
                    for live, (vm, handle) in vms.items():
                        start = time.perf_counter()
                        for i in range(first, min(ops, first + CP_CHUNK)):
                            t0 = time.perf_counter()
                            ch.ioeventfd(vm, handle, 0x2000_0000 + 8 * i, 4)
                            ch.ioeventfd(vm, handle, 0x2000_0000 + 8 * i, 4, deassign=True)
                            lats[live].append((time.perf_counter() - t0) / 2)
                        spent[live] += time.perf_counter() - start
                for live in counts:
                    lat_reps[live].append(statistics.median(lats[live]) * 1e6)
                    rate_reps[live].append(2 * ops / spent[live])
            for vm, handle in vms.values():
                ch.vm_destroy(vm)
                ch.handle_close(handle)
        lat10 = statistics.median(lat_reps[10])
        for live in counts:
            self.add_reps(
                "control-plane", {"live_bindings": live}, "ops/s", rate_reps[live], "ops/s"
            )
            self.add_reps(
                "control-plane",
                {"live_bindings": live},
                "latency_p50",
                lat_reps[live],
                "us",
                baseline=None if live == 10 else "@10 bindings",
                baseline_value=None if live == 10 else lat10,
            )

    def scale(self) -> None:
        """Aggregate 64 B echo throughput of 1, 2, 4, 8 VMs side by side; the runs' memory
        is sampled meanwhile (the 1- and 8-VM totals and the cost per VM come from here),
        and the 8-VM run is repeated on the reference path.

        The VMs start their transfers together (the VMM's start gate: each waits, booted,
        for the others) and the aggregate is every frame over the window from the first
        start to the last end. Each VM used to start as soon as it had booted and the
        figure was frames / the longest single VM's time: VMs whose boots were spread out
        ran partly one after another, each faster, and the sum read as if they had run
        side by side (the reference path's light start-up spread the 8 VMs' starts over
        ~0.2-0.45 s for transfers of ~0.1 s each; the kernels' heavy one lined them up)."""
        one: float | None = None
        cases = [(n, self.path) for n in self.plan.scale_vms]
        if self.path == KERNELS:
            cases.append((self.plan.memory_vms, REFERENCE))
        for n, path in cases:
            memory: list[dict[int, procmem.Reading]] = []

            def aggregate(
                n: int = n, path: str = path, memory: list[dict[int, procmem.Reading]] = memory
            ) -> float:
                # a total over the VMs (each runs its share): every run lasts about as
                # long, and one VM's run is long enough to be more than a few time slices
                share = self.plan.counts["scale"] // n
                params = {"count": max(1, share), "size": 64, "batch": 16}
                kinds = (
                    {"broker": 1, "vmm": 1, "guest": n, "echo device": n}
                    if n in (1, self.plan.memory_vms)
                    else None
                )
                result = self.run_vms(
                    [self.echo_vm(f"vm{i}", params, memory=8 << 20) for i in range(n)],
                    timeout=180,
                    path=path,
                    memory=kinds,
                    start_together=True,
                )
                rs = list(result["results"].values())
                if len(rs) != n or not all(r.get("ok") for r in rs):
                    raise BenchError(f"scale run with {n} VMs failed: {rs}")
                memory.append(result.get("memory", {}))
                window = max(r["ended"] for r in rs) - min(r["started"] for r in rs)
                return float(sum(r["frames"] for r in rs) / max(window, 1e-9))

            row = self.add_reps(
                "scale",
                {"vms": n},
                "msgs/s",
                self.values(aggregate),
                "msgs/s",
                path=path,
                baseline=None if n == 1 or path != self.path else "1 VM",
                baseline_value=None if path != self.path else one,
            )
            if n == 1:
                one = row.value
            if n in (1, self.plan.memory_vms) and all(memory):
                per_vm = n if n == self.plan.memory_vms else None
                self._memory_rows({"job": "echo", "vms": n}, memory, path, per_vm=per_vm)

    def _memory_rows(
        self,
        job: dict[str, Any],
        samples: list[dict[int, procmem.Reading]],
        path: str,
        per_vm: int | None = None,
        kinds: bool = False,
    ) -> None:
        """Memory rows from one steady sample per repetition: per process kind (RSS per
        process, Pss in the note), the totals (Pss and RSS), and the cost per VM (the
        guests' and devices' Pss / VMs)."""
        if kinds:
            names = sorted({r.kind for s in samples for r in s.values()})
            for kind in names:
                groups = [procmem.by_kind(s).get(kind, []) for s in samples]
                if not all(groups):
                    continue
                rss = [sum(r.rss_kib for r in g) / len(g) / MIB for g in groups]
                pss = statistics.median(sum(r.pss_kib for r in g) / len(g) / MIB for g in groups)
                n = len(groups[0])
                self.add_reps(
                    "memory",
                    {**job, "process": kind},
                    "rss/process",
                    rss,
                    "MiB",
                    path=path,
                    note=f"{n} process{'es' if n > 1 else ''}, Pss {pss:.1f} MiB each",
                )
        self.add_reps(
            "memory",
            {**job, "process": "total"},
            "pss",
            [sum(r.pss_kib for r in s.values()) / MIB for s in samples],
            "MiB",
            path=path,
            note=f"{len(samples[0])} processes",
        )
        self.add_reps(
            "memory",
            {**job, "process": "total"},
            "rss",
            [sum(r.rss_kib for r in s.values()) / MIB for s in samples],
            "MiB",
            path=path,
            note="shared pages counted once per process",
        )
        if per_vm:
            self.add_reps(
                "memory",
                {**job, "process": "per VM"},
                "pss",
                [
                    sum(
                        r.pss_kib for r in s.values() if r.kind not in ("broker", "vmm", "launcher")
                    )
                    / MIB
                    / per_vm
                    for s in samples
                ],
                "MiB",
                path=path,
                note="guest + its devices (Pss), averaged over the VMs",
            )

    def start_up(self) -> None:
        """The default job (``vbusemu run examples/two-vms.toml``, a copy in a private
        directory) timed from start to exit with a warm kernel cache, on each path, its
        processes' memory sampled meanwhile; the kernels' first-run compile (an empty
        numba cache) and their load from a warm cache, each in a fresh process."""
        for path in self.paths:
            walls, memory = [], []
            for _ in range(self.plan.reps):
                wall, mem = self._two_vms(path)
                walls.append(wall)
                memory.append(mem)
            self.add_reps(
                "start-up",
                {"job": "two-vms", "what": "vbusemu run, warm cache"},
                "wall",
                walls,
                "s",
                path=path,
            )
            if all(memory):
                self._memory_rows({"job": "two-vms"}, memory, path, kinds=True)
        if self.path != KERNELS:
            return
        compile_s, load_s = [], []
        for _ in range(self.plan.reps):
            with tempfile.TemporaryDirectory(prefix="vbusemu-numba-") as cache:
                compile_s.append(
                    self._timed(
                        python_module("shared.virtio.warm"),
                        {**path_env(KERNELS), "NUMBA_CACHE_DIR": cache},
                    )
                )
            load_s.append(self._timed(python_module("shared.virtio.warm"), path_env(KERNELS)))
        self.add_reps(
            "start-up",
            {"what": "kernel compile, empty cache"},
            "wall",
            compile_s,
            "s",
            path=KERNELS,
            note="python -m shared.virtio.warm",
        )
        self.add_reps(
            "start-up",
            {"what": "kernel load, warm cache"},
            "wall",
            load_s,
            "s",
            path=KERNELS,
            note="python -m shared.virtio.warm",
        )

    @staticmethod
    def _timed(argv: list[str], env: dict[str, str]) -> float:
        t0 = time.perf_counter()
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        if out.returncode:
            raise BenchError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr[-800:]}")
        return wall

    def _two_vms(self, path: str) -> tuple[float, dict[int, procmem.Reading]]:
        with tempfile.TemporaryDirectory(prefix="vbusemu-bench-job-") as tmp:
            topology = Path(tmp) / TWO_VMS.name
            shutil.copyfile(TWO_VMS, topology)
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                python_module("hostemu.cli", "run", str(topology)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=path_env(path),
            )
            with procmem.TreeSampler(proc.pid, TWO_VMS_KINDS) as sampler:
                try:
                    stdout, _ = proc.communicate(timeout=300)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise BenchError("the two-VM job did not finish in 300 s") from None
            wall = time.perf_counter() - t0
        if proc.returncode:
            raise BenchError(f"the two-VM job failed ({proc.returncode}): {stdout[-1500:]}")
        return wall, sampler.result()


# ---------------------------------------------------------------- plots


def _plain_log_axis(axis: Any) -> None:
    """A log axis labelled with plain numbers (10, 200, 1000), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 1 else f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def _finish_plot(
    plt: Any,
    fig: Any,
    ax: Any,
    path: Path,
    footnote: str,
    xticks: dict[float, str] | None = None,
    **settings: Any,
) -> str:
    """Axes settings (log axes labelled with plain numbers, or ``xticks``: position ->
    label), the legend outside the data (right of the axes), the machine/mode/path
    footnote under the figure; saved with everything inside the image."""
    ax.set(**settings)
    if settings.get("yscale") == "log":
        _plain_log_axis(ax.yaxis)
    if xticks:
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(sorted(xticks), [xticks[x] for x in sorted(xticks)])
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif settings.get("xscale") == "log":
        _plain_log_axis(ax.xaxis)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.text(0.01, 0.005, footnote, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return path.name


def plot_footnote(machine: dict[str, Any], mode: str, path: str) -> str:
    return (
        f"{machine.get('cpu_model')}, {machine.get('usable_cores')} usable of "
        f"{machine.get('cores')} cores; {mode} mode; data path: {path}"
    )


def plots(
    rows: list[Row],
    outdir: Path,
    rtt_samples: dict[str, dict[str, list[float]]] | None = None,
    footnote: str = "",
    path: str = KERNELS,
) -> list[str]:
    """PNG plots if matplotlib is installed; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(8, 4))
    for mode in MODES:
        for p, style in ((path, "-"), (REFERENCE, ":")):
            if p == path and style == ":":
                continue
            pts = sorted(
                (r.params["batch"], r.value)
                for r in rows
                if r.workload == "small-messages"
                and r.params.get("mode") == mode
                and r.metric == "msgs/s"
                and r.path == p
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    linestyle=style,
                    label=f"vbusemu {mode}" + (f" ({p})" if p != path else ""),
                )
    for kind, label in SMALL_KINDS.items():
        pts = sorted(
            (r.params["batch"], r.value)
            for r in rows
            if r.workload == "baseline" and r.params.get("kind") == kind and "batch" in r.params
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="s", linestyle="--", label=label)
    batches = {
        float(r.params["batch"]): str(r.params["batch"]) for r in rows if "batch" in r.params
    }
    written.append(
        _finish_plot(
            plt,
            fig,
            ax,
            outdir / "throughput_vs_batch.png",
            footnote,
            xticks=batches,
            xscale="log",
            yscale="log",
            xlabel="batch size (messages per notification)",
            ylabel="messages/s",
            title="64 B messages: throughput vs batch size",
        )
    )

    fig, ax = plt.subplots(figsize=(8, 4))
    series: list[tuple[str, Callable[[Row], bool]]] = [
        ("vbusemu (guest -> device)", lambda r: r.workload == "bulk" and r.path == path),
        (
            "vbusemu echo (and back, verified)",
            lambda r: r.workload == "bulk-echo" and r.path == path,
        ),
        (
            "Pipe",
            lambda r: (
                r.workload == "baseline" and r.params.get("kind") == "pipe" and "size" in r.params
            ),
        ),
        (
            "socketpair",
            lambda r: (
                r.workload == "baseline"
                and r.params.get("kind") == "socketpair"
                and "size" in r.params
            ),
        ),
        ("numpy copy", lambda r: r.params.get("kind") == "numpy-copy"),
        ("two-copy bound (numpy copy / 2)", lambda r: r.params.get("kind") == "numpy-copy"),
    ]
    sizes: set[int] = set()
    for label, pred in series:
        half = 0.5 if label.startswith("two-copy") else 1.0
        pts = sorted((r.params["size"], r.value / 1e9 * half) for r in rows if pred(r))
        if pts:
            sizes.update(int(s) for s, _ in pts)
            ax.plot(
                *zip(*pts, strict=True),
                marker="o",
                label=label,
                linestyle=":" if half != 1.0 else "-",
            )
    written.append(
        _finish_plot(
            plt,
            fig,
            ax,
            outdir / "throughput_vs_payload.png",
            footnote,
            xticks={float(s): fmt_size(s) for s in sizes},
            xscale="log",
            yscale="log",
            xlabel="buffer size",
            ylabel="GB/s",
            title="bulk: throughput vs buffer size",
        )
    )

    # latency: horizontal bars, one line of label per series, p50 and p99 side by side
    fig, ax = plt.subplots(figsize=(8, 5))
    labels, p50, p99 = [], [], []
    for r in rows:
        if r.metric == "rtt_p50" and r.path in (path, None):
            mate = [
                x
                for x in rows
                if x.metric == "rtt_p99"
                and x.params == r.params
                and x.workload == r.workload
                and x.path == r.path
            ]
            who = (
                f"vbusemu {r.params['mode']}"
                if r.workload == "round-trip"
                else str(r.params.get("kind"))
            )
            labels.append(f"{who}, {r.params.get('placement', 'any')}")
            p50.append(r.value)
            p99.append(mate[0].value if mate else 0)
    ys = list(range(len(labels)))
    ax.barh([y - 0.2 for y in ys], p50, height=0.4, label="p50")
    ax.barh([y + 0.2 for y in ys], p99, height=0.4, label="p99")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    written.append(
        _finish_plot(
            plt,
            fig,
            ax,
            outdir / "latency.png",
            footnote,
            xlabel="round trip (µs, log scale)",
            xscale="log",
            title="round-trip latency",
        )
    )
    if rtt_samples:
        written.append(_latency_cdf(plt, rtt_samples, outdir / "latency_cdf.png", footnote))
    return written


def _latency_cdf(
    plt: Any, samples: dict[str, dict[str, list[float]]], path: Path, footnote: str
) -> str:
    """One panel per placement: the distribution (CDF) of every round-trip series."""
    fig, axes = plt.subplots(
        1, len(samples), figsize=(4.5 * len(samples), 4), squeeze=False, sharey=True
    )
    for ax, (placement, series) in zip(axes[0], samples.items(), strict=True):
        for label, values in series.items():
            if values:
                xs = sorted(values)
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
        ax.set(xscale="log", xlabel="round trip (µs)", title=f"placement: {placement}")
        _plain_log_axis(ax.xaxis)
    axes[0][0].set_ylabel("fraction of round trips")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="upper center",
            ncol=len(labels),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, 1.0),
        )
    fig.text(0.01, 0.005, footnote, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.92))
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------- main


SHRINK_ENV = "VBUSEMU_BENCH_SHRINK"


def _shrink_factor() -> float:
    """``VBUSEMU_BENCH_SHRINK`` (0 < x <= 1, default 1): for tests of the output only."""
    raw = os.environ.get(SHRINK_ENV, "1")
    try:
        factor = float(raw)
    except ValueError:
        factor = math.nan
    if not 0 < factor <= 1:
        raise ConfigError(f"{SHRINK_ENV}={raw!r}: must be a number in (0, 1]")
    return factor


def main(quick: bool, out: str | None) -> int:
    plan = Plan.make(quick).shrunk(_shrink_factor())
    mode = "quick" if quick else "full"
    path = KERNELS if jit_enabled() else REFERENCE
    outdir = Path(out) if out else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, flush=True)

    load_before = list(os.getloadavg())
    say(f"vbusemu bench ({mode}, {plan.reps} repetitions, path {path}): results in {outdir}")
    started = time.monotonic()
    # Outside the measured time: the kernels compiled (or loaded) once into numba's cache,
    # so no measured process compiles them.
    if not warm_kernels():
        return 1
    with tempfile.TemporaryDirectory(prefix="vbusemu-bench-") as tmp:
        os.chmod(tmp, 0o700)
        sock = os.path.join(tmp, "broker.sock")
        with open(os.path.join(tmp, "broker.log"), "w") as log:
            broker: ManagedProcess = start_broker(sock, Policy.REFCOUNT, stderr=log, stdout=log)
            bench = Bench(plan, sock, say, broker.pid, path)
            try:
                steps = [
                    bench.small_messages,
                    bench.round_trip,
                    bench.bulk,
                    bench.control_plane,
                    bench.scale,
                    bench.start_up,
                ]
                for i, step in enumerate(steps, 1):
                    say(
                        f"[{i}/{len(steps)}] {step.__name__.replace('_', ' ')} "
                        f"({time.monotonic() - started:.0f} s)"
                    )
                    step()
            except BenchError as e:
                say(f"FAILED: {e}")
                return 1
            finally:
                broker.stop()
    load_after = list(os.getloadavg())
    elapsed = time.monotonic() - started
    machine = {**baselines.machine_info(), "load_before": load_before, "load_after": load_after}
    targets = evaluate(TARGETS, bench.rows, path)
    (outdir / "results.json").write_text(
        json.dumps([r.to_json(machine) for r in bench.rows], indent=2) + "\n"
    )
    (outdir / "summary.json").write_text(
        json.dumps(
            summary(
                bench.rows,
                targets,
                machine,
                mode=mode,
                reps=plan.reps,
                path=path,
                load_before=load_before,
                load_after=load_after,
                elapsed_s=elapsed,
            ),
            indent=2,
        )
        + "\n"
    )
    header = header_lines(machine, mode, plan.reps, path, load_before, load_after)
    (outdir / "results.md").write_text(markdown(bench.rows, targets, header))
    pngs = plots(bench.rows, outdir, bench.rtt_samples, plot_footnote(machine, mode, path), path)
    say("")
    say(console(bench.rows, targets, header))
    say("")
    say(
        f"wrote {outdir / 'results.json'}, summary.json, results.md"
        + (f", {', '.join(pngs)}" if pngs else " (no plots: matplotlib is not installed)")
    )
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main("--quick" in sys.argv, None))
