"""Shared fixtures: every test fails if it leaks an fd, a /dev/shm entry or a process.

The leak guard is autouse. It snapshots this process's open fds, ``/dev/shm`` and our
child processes before the test and compares afterwards. Leftover children are killed
by pid (never by name) and reported; leftover /dev/shm entries are removed and
reported; leaked fds are listed with what they point to.

Every wall-clock bound is scaled by ``VBUSEMU_TEST_TIME_SCALE`` (:mod:`tests.timing`):
the pytest-timeout limit of every test (its marker, or the configured default) too.
Hypothesis gets no per-example deadline: a busy machine must not fail a property.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from hostemu.launcher import ManagedProcess, start_broker
from shared.channel import Channel
from shared.wire import Policy
from tests import timing

settings.register_profile("vbusemu", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vbusemu")


def _scaled_limit(value: object) -> object:
    """A pytest-timeout limit times the scale (0 and None: no limit, left alone)."""
    if isinstance(value, int | float | str) and float(value) > 0:
        return timing.scaled(float(value))
    return value


def _configured_timeout(config: pytest.Config) -> object:
    """The limit pytest-timeout applies to a test without a marker (as it looks it up)."""
    value = config.getoption("timeout", None)
    if value is None:
        value = os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout")
    return value


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scale every test's pytest-timeout limit by :data:`tests.timing.TIME_SCALE`: a
    scaled marker in front of the one that applied (the closest marker wins)."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    default = _configured_timeout(config)
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            if _scaled_limit(default) is not default:
                item.add_marker(pytest.mark.timeout(_scaled_limit(default)), append=False)
            continue
        args, kwargs = list(marker.args), dict(marker.kwargs)
        if "timeout" in kwargs:
            kwargs["timeout"] = _scaled_limit(kwargs["timeout"])
        elif args:
            args[0] = _scaled_limit(args[0])
        item.add_marker(pytest.mark.timeout(*args, **kwargs), append=False)


def open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def children() -> set[int]:
    me = str(os.getpid())
    kids: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 is the ppid; the command name (field 2) may contain spaces
        if stat.rsplit(")", 1)[1].split()[1] == me:
            kids.add(int(name))
    return kids


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    fds_before = open_fds()
    shm_before = shm_entries()
    kids_before = children()
    yield
    if set(open_fds()) - set(fds_before):
        gc.collect()  # only when needed: a full collection per test is slow
    problems: list[str] = []
    deadline = timing.deadline(5.0)
    stray = children() - kids_before
    while stray and not timing.expired(deadline):  # let exiting children be reaped
        for pid in stray:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
        stray = children() - kids_before
    for pid in stray:
        problems.append(f"child process {pid} left running (killed)")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    for entry in sorted(shm_entries() - shm_before):
        problems.append(f"/dev/shm/{entry} left behind (removed)")
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{entry}")
    fds_after = open_fds()
    for fd in sorted(set(fds_after) - set(fds_before)):
        problems.append(f"fd {fd} leaked -> {fds_after[fd]}")
    if problems:
        pytest.fail("leak guard:\n  " + "\n  ".join(problems))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A private 0700 directory short enough for AF_UNIX paths (108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vb-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class BrokerHandle:
    path: str
    proc: ManagedProcess
    log: Path
    channels: list[Channel] = field(default_factory=list)

    def connect(self) -> Channel:
        ch = Channel.connect(self.path)
        self.channels.append(ch)
        return ch

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def broker_factory(sockdir: Path) -> Iterator[Callable[..., BrokerHandle]]:
    """Start brokers (real processes); all are stopped and their logs checked after."""
    started: list[BrokerHandle] = []

    def start(
        policy: Policy = Policy.HUP,
        ack_timeout: float = 2.0,
        name: str = "broker",
        args: Sequence[str] = (),
    ) -> BrokerHandle:
        run = sockdir / name
        run.mkdir(mode=0o700)
        log = sockdir / f"{name}.log"
        with open(log, "w") as logf:
            proc = start_broker(
                str(run / "broker.sock"),
                policy,
                ack_timeout=ack_timeout,
                stderr=logf,
                stdout=logf,
                extra_args=args,
                timeout=timing.scaled(15),
            )
        handle = BrokerHandle(str(run / "broker.sock"), proc, log)
        started.append(handle)
        return handle

    yield start
    for b in started:
        for ch in b.channels:
            ch.close()
        # 0: we stopped it; < 0: a fault test killed it by a signal; > 0: it died by itself
        status = b.proc.stop()
        assert status <= 0, f"broker exited with {status}:\n{b.log_text()}"
        assert "Traceback" not in b.log_text(), b.log_text()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerHandle]) -> BrokerHandle:
    return broker_factory()
