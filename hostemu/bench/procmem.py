"""Resident memory of a run's processes, read from ``/proc`` while the run goes on.

:class:`TreeSampler` walks the process tree under a root pid (plus any extra pids, e.g.
the bench's broker) every :data:`INTERVAL` seconds in a thread, and reads for each
process ``VmRSS`` from ``/proc/PID/status`` (the pages it has resident, shared ones
counted in full) and ``Pss`` from ``/proc/PID/smaps_rollup`` (each shared page divided
among the processes mapping it -- the libraries every Python process maps, and the guest
RAM a guest shares with its devices -- so Pss adds up to the memory the run really
uses). Each process is named by its command line (:func:`kind_of`).

The figure for a process is its highest reading among the samples taken while every
expected process was alive (after boot, through the traffic, until the first one exits):
a steady point, not a start-up transient and not a teardown. ``VmRSS`` is read at every
sample (cheap); ``smaps_rollup`` walks every mapping (milliseconds for a process that
imported numba), so a process's Pss is read in a complete sample only when its RSS grew
by more than :data:`PSS_REREAD` since its last Pss reading -- a few times per process and
run, so that the sampling does not take a CPU from the run it measures.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

INTERVAL = 0.1
PSS_REREAD = 0.02

DEVICE_MODULE = "hostemu.devices"


def kind_of(cmdline: Sequence[str]) -> str | None:
    """``launcher``, ``broker``, ``vmm``, ``guest``, ``<model> device`` (echo, venet,
    blk, console...), ``warm`` (the launcher's short-lived kernel warm-up) or None for
    anything else."""
    args = list(cmdline)
    if "-m" not in args or args.index("-m") + 1 >= len(args):
        return None
    i = args.index("-m")
    module, rest = args[i + 1], args[i + 2 :]
    if module == "hostemu.cli" and rest[:1] == ["run"]:
        return "launcher"
    if module == "hostemu.broker":
        return "broker"
    if module == "hostemu.vmm":
        return "vmm"
    if module == "guestemu.guest":
        return "guest"
    if module == DEVICE_MODULE:
        return f"{rest[0]} device" if rest else "device"
    if module == "shared.virtio.warm":
        return "warm"
    return None


def parse_kib(text: str, field: str) -> int | None:
    """The ``field:  N kB`` line of a ``/proc`` status or smaps_rollup text, in KiB."""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = _read(f"/proc/{pid}/task/{tid}/children")
            if text:
                out += [int(x) for x in text.split()]
    return out


def tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children(pid)
    return seen


@dataclass
class Reading:
    kind: str
    rss_kib: int
    pss_kib: int


def cmdline_kind(pid: int) -> str | None:
    raw = _read(f"/proc/{pid}/cmdline")
    return kind_of(raw.rstrip("\0").split("\0")) if raw else None


def rss_kib(pid: int) -> int | None:
    status = _read(f"/proc/{pid}/status")
    return parse_kib(status, "VmRSS") if status else None


def pss_kib(pid: int) -> int | None:
    rollup = _read(f"/proc/{pid}/smaps_rollup")
    return parse_kib(rollup, "Pss") if rollup else None


def complete(sample: dict[int, Reading], expected: dict[str, int]) -> bool:
    """Whether a sample holds at least the expected number of processes of each kind."""
    counts: dict[str, int] = {}
    for r in sample.values():
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return all(counts.get(k, 0) >= n for k, n in expected.items())


def steady(samples: Iterable[dict[int, Reading]], expected: dict[str, int]) -> dict[int, Reading]:
    """Each process's highest reading among the complete samples (empty if none was)."""
    best: dict[int, Reading] = {}
    for sample in samples:
        if not complete(sample, expected):
            continue
        for pid, r in sample.items():
            if r.kind == "warm":
                continue
            old = best.get(pid)
            best[pid] = (
                r
                if old is None
                else Reading(r.kind, max(old.rss_kib, r.rss_kib), max(old.pss_kib, r.pss_kib))
            )
    return best


def by_kind(readings: dict[int, Reading]) -> dict[str, list[Reading]]:
    out: dict[str, list[Reading]] = {}
    for r in readings.values():
        out.setdefault(r.kind, []).append(r)
    return out


class TreeSampler:
    """Samples the tree under ``root`` (and ``extra`` pids) in a thread until stopped;
    :meth:`result` is each process's steady reading (see the module docstring)."""

    def __init__(
        self,
        root: int,
        expected: dict[str, int],
        extra: Sequence[int] = (),
        interval: float = INTERVAL,
    ) -> None:
        self.root = root
        self.expected = expected
        self.extra = list(extra)
        self.interval = interval
        self.samples: list[dict[int, Reading]] = []
        self._pss: dict[int, tuple[int, int]] = {}  # pid -> (RSS then, Pss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="procmem")

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[int, Reading]:
        return steady(self.samples, self.expected)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            sample: dict[int, Reading] = {}
            for pid in [*tree(self.root), *self.extra]:
                # read every time: a child forked and not yet exec'ed shows its parent's
                kind, rss = cmdline_kind(pid), rss_kib(pid)
                if kind is not None and rss is not None:
                    sample[pid] = Reading(kind, rss, self._pss.get(pid, (0, 0))[1])
            if complete(sample, self.expected):
                for pid, r in sample.items():
                    then, pss = self._pss.get(pid, (0, 0))
                    if r.kind != "warm" and r.rss_kib > then * (1 + PSS_REREAD):
                        fresh = pss_kib(pid)
                        if fresh is not None:
                            self._pss[pid] = (r.rss_kib, max(pss, fresh))
                            r.pss_kib = max(pss, fresh)
            self.samples.append(sample)
