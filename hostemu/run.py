"""``vbusemu run [topology.toml]``: start a whole topology, show it live, summarize, clean up.

The launcher starts the broker (in a private 0700 directory) and the VMM as separate
processes; the VMM creates the VMs and starts the device and guest processes. While it
runs the launcher prints what the guests report (console lines prefixed by VM name,
milestones). At the end it prints a summary table and exits 0 only if every workload
succeeded, naming the first discrepancy otherwise.

Teardown is graceful, then forced, on completion, failure or Ctrl-C: the VMM destroys its
VMs (guests and devices get peer-gone and exit), then the broker is stopped; any process
still there after the grace period is killed by pid. Because a crash is a leave, even a
VMM killed outright leaves nothing behind: once the broker goes, every guest and device
process sees EOF and exits -- and every child also dies with its parent
(:mod:`shared.lifeline`), so a launcher killed outright leaves nothing either.

Before starting anything the launcher locks every disk image of the topology
(:mod:`hostemu.imagelock`) and holds the locks until teardown is over, so a second run
using one of them exits 2 at once, naming the image.

Ctrl-C reaches the whole foreground process group, but only the launcher acts on it (the
children ignore SIGINT): it prints one line, stops the processes in order -- SIGTERM to
the VMM, which stops its guests, then their devices, then exits; then the broker -- and
exits with :data:`EXIT_INTERRUPTED` (130, as a shell reports a SIGINT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from hostemu import topology as topo
from hostemu.imagelock import lock_images
from hostemu.launcher import (
    ManagedProcess,
    python_module,
    start_broker,
    warm_kernels,
)
from shared.errors import ConfigError, PeerGoneError
from shared.lifeline import CTRL_C, CtrlC, become_subreaper, reap_orphans

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent / "examples" / "two-vms.toml"
"""Shipped with the package; in a source checkout also reachable as ``examples/``."""


def default_topology() -> topo.Topology:
    """The default topology (the two-VM example)."""
    return example_topology(DEFAULT_TOPOLOGY)


def example_topology(path: Path) -> topo.Topology:
    """A topology shipped in the package's ``examples``. In a source checkout its disk
    images go next to it (in ``examples/``); in an installed package -- not a place to
    write -- to the user's data directory (``$XDG_DATA_HOME/vbusemu``, else
    ``~/.local/share/vbusemu``)."""
    if (DEFAULT_TOPOLOGY.parent.parent.parent / "examples").is_dir():
        return topo.load(path)
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    base = data / "vbusemu"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise topo.TopologyError(str(path), [f"cannot read: {e}"]) from None
    return dataclasses.replace(topo.loads(text, base, str(path)), source=path)


def examples() -> list[str]:
    """The names of the shipped example topologies."""
    return sorted(p.stem for p in DEFAULT_TOPOLOGY.parent.glob("*.toml"))


def resolve_topology(arg: str | None) -> topo.Topology:
    """What ``vbusemu run [arg]`` runs: the default; a topology file; or, where no such
    file exists, a shipped example by name (``echo``, ``echo.toml``). A file inside the
    shipped examples is treated as that example (its disk images do not go into an
    installed package)."""
    if arg is None:
        return default_topology()
    path = Path(arg)
    shipped = DEFAULT_TOPOLOGY.parent / path.name
    if path.exists():
        if shipped.exists() and path.resolve() == shipped.resolve():
            return example_topology(shipped)
        return topo.load(path)
    if path.name == arg and path.stem in examples():  # a bare name: the example
        return example_topology(DEFAULT_TOPOLOGY.parent / f"{path.stem}.toml")
    raise topo.TopologyError(
        arg, [f"no such file, nor a shipped example (examples: {', '.join(examples())})"]
    )


EXIT_INTERRUPTED = 130
INTERRUPTED_LINE = "vbusemu run: interrupted; stopping guests, devices, VMM and broker"


class Interrupted(Exception):
    """Ctrl-C seen: unwind to the teardown."""


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def ok_line(rows: list[dict[str, Any]]) -> str:
    """What a good run checked, as its last line says it."""
    checked = []
    if any(r.get("frames") for r in rows):
        checked.append("every frame arrived exactly once, in order, intact")
    if any(r.get("disk_mb_per_s_read") is not None for r in rows):
        checked.append("every block read matched")
    return "; ".join(checked) or "every workload finished and reported no problem"


def summary_rows(done: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per VM: the numbers the summary table shows."""
    rows = []
    for vm, result in sorted(done.get("results", {}).items()):
        devices = done.get("stats", {}).get(vm, {}).get("devices", {})
        irq = sum(int(d.get("counters", {}).get("interrupts", 0)) for d in devices.values())
        irq_off = sum(
            int(d.get("counters", {}).get("interrupts_suppressed", 0)) for d in devices.values()
        )
        parts = result.get("parts", {"workload": result})
        net = parts.get("net", {}) if "net" in parts else result
        disk = parts.get("blk", {})
        rows.append(
            {
                "vm": vm,
                "ok": bool(result.get("ok")),
                "frames": net.get("frames"),
                "frames_per_s": net.get("frames_per_s"),
                "mb_per_s": net.get("mb_per_s"),
                "rtt_p50_us": net.get("rtt_p50_us"),
                "rtt_p99_us": net.get("rtt_p99_us"),
                "interrupts": irq,
                "interrupts_suppressed": irq_off,
                "doorbells": sum(int(p.get("doorbells", 0)) for p in parts.values()),
                "doorbells_suppressed": sum(
                    int(p.get("doorbells_suppressed", 0)) for p in parts.values()
                ),
                "disk_mb_per_s_write": disk.get("mb_per_s_write"),
                "disk_mb_per_s_read": disk.get("mb_per_s_read"),
                "exits": done.get("stats", {}).get(vm, {}).get("exits"),
            }
        )
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    head = (
        "VM",
        "ok",
        "frames",
        "frames/s",
        "MB/s",
        "RTT p50",
        "RTT p99",
        "irq sent/supp",
        "doorbells rung/supp",
        "disk W/R MB/s",
        "exits",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["vm"],
                "yes" if r["ok"] else "NO",
                _fmt(r["frames"]),
                _fmt(r["frames_per_s"]),
                _fmt(r["mb_per_s"], digits=2),
                _fmt(r["rtt_p50_us"], " us", 0),
                _fmt(r["rtt_p99_us"], " us", 0),
                f"{r['interrupts']}/{r['interrupts_suppressed']}",
                f"{r['doorbells']}/{r['doorbells_suppressed']}",
                f"{_fmt(r['disk_mb_per_s_write'], digits=2)}/"
                f"{_fmt(r['disk_mb_per_s_read'], digits=2)}",
                _fmt(r["exits"]),
            )
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines
    )


def first_discrepancy(done: dict[str, Any]) -> str | None:
    for vm, result in sorted(done.get("results", {}).items()):
        if not result.get("ok"):
            return f"{vm}: {result.get('error') or 'workload failed'}"
    for err in done.get("errors", []):
        return str(err)
    return None


class Launcher:
    def __init__(
        self,
        topology: topo.Topology,
        out: TextIO = sys.stdout,
        timeout: float = 120.0,
        ctrl_c: CtrlC | None = None,
    ) -> None:
        self.topology = topology
        self.out = out
        self.timeout = timeout
        self.ctrl_c = ctrl_c
        self.interrupted = False
        self.broker: ManagedProcess | None = None
        self.vmm: ManagedProcess | None = None
        self.logfile: Any = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _check_interrupt(self) -> None:
        if self.ctrl_c is not None and self.ctrl_c.pending:
            raise Interrupted

    def run(self) -> int:
        become_subreaper()  # orphaned grandchildren come to us; reaped after the teardown
        with tempfile.TemporaryDirectory(prefix="vbusemu-") as tmp:
            os.chmod(tmp, 0o700)
            log_path = Path(tmp) / "processes.log"
            with open(log_path, "w") as self.logfile:
                try:
                    code = self._run(Path(tmp))
                    self._check_interrupt()  # a Ctrl-C while the summary was printed
                except Interrupted:
                    self._interrupted()
                    code = EXIT_INTERRUPTED
                finally:
                    self._teardown()
                    reap_orphans()
                    self.logfile.flush()
                    text = log_path.read_text()
                    # Interrupted, processes may log why they stopped; a traceback is a bug.
                    if "Traceback" in text or ("ERROR" in text and not self.interrupted):
                        self.say("--- process log ---\n" + text[-4000:])
                if self.ctrl_c is not None and self.ctrl_c.pending:
                    self._interrupted()  # a Ctrl-C during the teardown
                    code = EXIT_INTERRUPTED
                return code

    def _interrupted(self) -> None:
        """Say it once, on stderr; the teardown then stops the processes at once."""
        if not self.interrupted:
            self.interrupted = True
            print(INTERRUPTED_LINE, file=sys.stderr, flush=True)

    def _run(self, tmp: Path) -> int:
        sock = str(tmp / "broker.sock")
        self._check_interrupt()
        if not warm_kernels(lambda: self.ctrl_c is not None and self.ctrl_c.pending):
            raise Interrupted
        self.broker = start_broker(
            sock, self.topology.policy, stderr=self.logfile, stdout=self.logfile
        )
        self._check_interrupt()
        self.say(
            f"broker pid {self.broker.pid} on {sock} "
            f"(release policy {self.topology.policy.name.lower()})"
        )
        spec = json.dumps(topo.to_vmm_spec(self.topology))
        self.vmm = ManagedProcess(
            "vmm",
            python_module(
                "hostemu.vmm", "--socket", sock, "--spec", spec, "--timeout", str(self.timeout)
            ),
            stderr=self.logfile,
        )
        self._check_interrupt()
        n_vms = len(self.topology.vms)
        self.say(f"vmm pid {self.vmm.pid}: {n_vms} VM{'' if n_vms == 1 else 's'}")
        done = self._follow(self.vmm)
        if done is None:
            self.say("FAILED: the VMM ended without a result")
            return 1
        rows = summary_rows(done)
        self.say("")
        self.say(format_summary(rows))
        problem = first_discrepancy(done)
        if problem is not None or not rows:
            self.say(f"\nFAILED: {problem or 'no workload reported'}")
            return 1
        self.say(f"\nOK: {ok_line(rows)}")
        return 0

    def _follow(self, vmm: ManagedProcess) -> dict[str, Any] | None:
        """Print the VMM's progress lines until its final report (or its exit)."""
        deadline = time.monotonic() + self.timeout + 30
        fd = vmm.stdout_fd()
        wake = [self.ctrl_c.fileno()] if self.ctrl_c is not None else []
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd, *wake], [], [], 0.5)
            self._check_interrupt()
            if not ready:
                continue
            lines = vmm.poll_lines()
            if lines is None:
                return None
            for obj in lines:
                if obj.get("event") == "vmm_done":
                    return obj
                if obj.get("event") == "guest_event":
                    self._progress(obj)
        return None

    def _progress(self, ev: dict[str, Any]) -> None:
        name, vm = ev.get("name"), ev.get("vm")
        if name == "console":
            self.say(f"[{vm}] {ev.get('text', '')}")
        else:
            fields = {k: v for k, v in ev.items() if k not in ("event", "name", "vm")}
            self.say(f"[{vm}] {name} {json.dumps(fields, sort_keys=True)}")

    def _teardown(self) -> None:
        """The VMM first (it stops its guests, then their devices), then the broker."""
        if self.vmm is not None:
            if self.interrupted:
                self.vmm.terminate()  # SIGTERM now, then SIGKILL
            else:
                self.vmm.stop()  # graceful (EOF/SIGTERM), then SIGKILL
        if self.broker is not None:
            self.broker.stop()


def main(path: str | None, timeout: float = 120.0) -> int:
    """``vbusemu run``: exit 0 (all good), 1 (a discrepancy or failure), 2 (a bad
    topology) or 130 (Ctrl-C)."""
    ctrl_c = CTRL_C
    own = not ctrl_c.installed  # not the ``vbusemu`` command (a test, python -m)
    if own:
        ctrl_c = CtrlC()
    previous = signal.getsignal(signal.SIGINT)
    ctrl_c.install()
    try:
        try:
            topology = resolve_topology(path)
            # Before anything starts: a second run of the same images stops here.
            locks = lock_images(topo.image_paths(topology))
        except ConfigError as e:
            print(f"vbusemu run: {e}", file=sys.stderr)
            return 2
        for image in locks.unlocked:
            print(
                f"vbusemu run: warning: disk image {image} cannot be locked on its "
                "filesystem; nothing stops another run from using it at the same time",
                file=sys.stderr,
            )
        launcher = Launcher(topology, timeout=timeout, ctrl_c=ctrl_c)
        try:
            with locks:  # released only once the launcher has stopped every process
                return launcher.run()
        except PeerGoneError as e:
            print(f"vbusemu run: stopped ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
    finally:
        # Further Ctrl-Cs were ours until here: nothing is left to stop.
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, previous)
        if own:
            ctrl_c.close()
