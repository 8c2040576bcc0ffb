"""Ctrl-C on ``vbusemu run``: one line, exit 130, no traceback, nothing left behind.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the launcher, the
broker, the VMM, every guest and device process. Each trial starts ``vbusemu run`` in a
session of its own (as run.sh starts it: SIGINT ignored until vbusemu takes it over) and
sends SIGINT to that whole group at a random point -- right after the start, while the
guests boot, or while they push frames as fast as they can (busy, halt-polling guests) --
then checks the exit status, the output and that no process of the session is left.
"""

from __future__ import annotations

import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostemu.run import EXIT_INTERRUPTED, INTERRUPTED_LINE
from shared.lifeline import processes
from tests import timing

ROOT = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("VBUSEMU_CTRL_C_TRIALS", "14"))
LINES_BEFORE_TRAFFIC = 16
"""Progress lines of two-vms.toml before any frame is answered: broker, vmm, and per guest
booting, pci, disk, blk_flushed, disk ok, net role, net_ready."""


def session_members(sid: int) -> list[str]:
    """Every process (zombies included) whose session is ``sid``: ``"pid state cmdline"``."""
    found = []
    for pid, fields in processes():
        if int(fields[3]) != sid:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:  # gone meanwhile
            continue
        found.append(f"{pid} {fields[0].decode()} {cmd}")
    return found


def start(topology: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, VBUSEMU_CTRL_C="1", PYTHONUNBUFFERED="1")

    def as_run_sh() -> None:  # run.sh: `trap '' INT`, then exec vbusemu
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen(
        [sys.executable, "-m", "hostemu.cli", "run", str(topology), "--timeout", "120"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=as_run_sh,
    )


def read_lines(proc: subprocess.Popen[bytes], count: int, limit: float = 120.0) -> bytes:
    """Stdout until it has ``count`` lines (or it ends)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + limit
    while out.count(b"\n") < count and time.monotonic() < deadline:
        if select.select([fd], [], [], 1.0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    return out


def one_trial(topology: Path, lines: int, delay: float) -> str | None:
    """Interrupt after ``lines`` progress lines and ``delay`` seconds; None if all is
    well, else what went wrong."""
    proc = start(topology)
    try:
        out = read_lines(proc, lines)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest, err_b = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # a hang: the assertion below reports it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    left = session_members(proc.pid)  # right at its exit: it waited for everything
    stdout = (out + rest).decode(errors="replace")
    stderr = err_b.decode(errors="replace")
    problems = []
    if proc.returncode != EXIT_INTERRUPTED:
        problems.append(f"exit status {proc.returncode}")
    if "Traceback" in stdout + stderr or "Exception ignored" in stdout + stderr:
        problems.append("a traceback")
    if stderr.splitlines() != [INTERRUPTED_LINE]:
        problems.append(f"stderr is not exactly the one line: {stderr[-2000:]!r}")
    if left:
        time.sleep(2.0)
        problems.append(f"left at exit: {left}; 2 s later: {session_members(proc.pid)}")
    sock = re.search(r"on (\S+)/broker\.sock", stdout)
    if sock and Path(sock.group(1)).exists():
        problems.append(f"{sock.group(1)} left behind")
    if not problems:
        return None
    return f"after line {lines} + {delay:.2f}s: " + "; ".join(problems) + f"\n{stdout[-3000:]}"


@pytest.mark.timeout(900)
def test_sigint_to_process_group_exits_130_cleanly(tmp_path: Path) -> None:
    # Many more frames than the default, so the guests are still busy (polling, halting)
    # at every interrupt point; disk images go next to the copy.
    text = (ROOT / "examples" / "two-vms.toml").read_text()
    topology = tmp_path / "two-vms.toml"
    topology.write_text(text.replace("count = 2000", "count = 1000000"))
    # A first run says once that it compiles the kernels: have that said before the trials,
    # whose stderr must be the interrupt line alone.
    subprocess.run(
        [sys.executable, "-m", "shared.virtio.warm"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=timing.scaled(120),
    )
    seed = int(os.environ.get("VBUSEMU_CTRL_C_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    points = [(1, 0.0)] * 3  # right after the start: the VMM is starting its processes
    points += [(LINES_BEFORE_TRAFFIC, rng.uniform(0.0, 2.0)) for _ in range(3)]  # traffic
    while len(points) < TRIALS:
        points.append((rng.randint(1, LINES_BEFORE_TRAFFIC), rng.uniform(0.0, 0.3)))
    failures = [f for f in (one_trial(topology, n, d) for n, d in points) if f is not None]
    assert not failures, f"seed {seed}: {len(failures)} of {len(points)} trials failed:\n" + (
        "\n\n".join(failures)
    )
