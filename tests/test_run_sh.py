"""``run.sh``: two first-time runs at once take turns setting up ``.venv``.

Real ``run.sh`` and real ``flock``, fake Python: ``PYTHON`` points at a stand-in whose
``-m venv`` makes a fake virtualenv, whose ``pip install -e`` logs itself and then blocks
on a FIFO until the test releases it, and whose ``vbusemu`` reports whether it inherited
the setup lock's descriptor. So the test decides when the first setup finishes, sees the
second run wait for it (by its message, not by timing), and counts the installs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
# A python3 that makes fake virtualenvs; everything else goes to the real one.
if [ "${1-}" = -m ] && [ "${2-}" = venv ]; then
  mkdir -p "$3/bin"
  cp "$FAKE_DIR/venv-python" "$3/bin/python"
  cp "$FAKE_DIR/vbusemu" "$3/bin/vbusemu"
  echo "venv $$" >>"$FAKE_DIR/events"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""

FAKE_VENV_PYTHON = """#!/usr/bin/env bash
# The fake venv's python: pip installs are logged; the editable one waits for the gate.
if [ "${1-}" = -m ] && [ "${2-}" = pip ]; then
  echo "pip-start $$ ${*:3}" >>"$FAKE_DIR/events"
  case " $* " in *" -e "*) cat "$FAKE_DIR/gate" >/dev/null ;; esac
  echo "pip-end $$" >>"$FAKE_DIR/events"
  exit 0
fi
exit 99
"""

FAKE_VBUSEMU = """#!/usr/bin/env bash
if [ -e "/proc/$$/fd/9" ]; then held="fd9-open"; else held="fd9-closed"; fi
echo "vbusemu $* $held"
"""


def _lines(stream: object, out: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        out.put(line.rstrip("\n"))
    out.put(None)


class Run:
    """One ``run.sh ps --help`` with its stderr read line by line in the background."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [str(repo / "run.sh"), "ps", "--help"],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: cleanup reaches its children
        )
        self.err: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=_lines, args=(self.proc.stderr, self.err), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on stderr; saw {self.seen}"
            try:
                line = self.err.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"stderr closed before {text!r}; saw {self.seen}"
            self.seen.append(line)
            if text in line:
                return

    def finish(self, timeout: float = 20.0) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        while True:
            try:
                line = self.err.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        assert self.proc.returncode == 0, (out, self.seen)
        return out

    def kill(self) -> None:
        """Kill the run and everything it started; close its pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _open_gate(gate: Path) -> None:
    """Release every fake pip waiting on the gate (nobody waiting: nothing to do)."""
    try:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: no reader
            raise
        return
    os.close(fd)


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
def test_two_first_runs_at_once_set_up_venv_once_and_both_succeed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(ROOT / "run.sh", repo / "run.sh")
    (repo / "pyproject.toml").write_text('[project]\nname = "fake"\n')
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (
        ("python3", FAKE_PYTHON),
        ("venv-python", FAKE_VENV_PYTHON),
        ("vbusemu", FAKE_VBUSEMU),
    ):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    os.mkfifo(fake / "gate")
    env = {
        **os.environ,
        "PYTHON": str(fake / "python3"),
        "REAL_PYTHON": sys.executable,
        "FAKE_DIR": str(fake),
    }

    first = Run(repo, env)
    second: Run | None = None
    try:
        first.wait_for("setting up")
        second = Run(repo, env)
        # The second run finds the lock taken and says it waits (it must not set up).
        second.wait_for("waiting for another run.sh")
        _open_gate(fake / "gate")  # let the first setup finish
        out_first = first.finish()
        out_second = second.finish()
    finally:
        _open_gate(fake / "gate")
        for run in (first, second):
            if run is not None:
                run.kill()

    # Both ran the command, and neither command inherited the lock's descriptor.
    assert out_first.strip() == "vbusemu ps --help fd9-closed"
    assert out_second.strip() == "vbusemu ps --help fd9-closed"
    assert not any(line.startswith("run.sh: setting up") for line in second.seen), second.seen
    events = (fake / "events").read_text().splitlines()
    assert sum(e.startswith("venv ") for e in events) == 1, events
    assert sum(e.startswith("pip-start ") and " -e " in e for e in events) == 1, events
    assert (repo / ".venv" / ".vbusemu-installed").exists()

    # A third run finds everything ready: quiet, no lock needed, no install.
    third = Run(repo, env)
    try:
        assert third.finish().strip() == "vbusemu ps --help fd9-closed"
    finally:
        third.kill()
    assert third.seen == []
    assert (fake / "events").read_text().splitlines() == events
