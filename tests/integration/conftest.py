"""Fixtures for real-process tests: a broker, a VMM channel, guest and device processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hostemu.launcher import ManagedProcess, spawn_device, spawn_guest
from shared.channel import Channel
from shared.wire import Scope
from tests import timing
from tests.conftest import BrokerHandle


@dataclass
class Vmm:
    """A test acting as the VMM: owns VMs and devices, starts their processes."""

    broker: BrokerHandle
    channel: Channel
    logdir: Path
    procs: list[ManagedProcess] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def _log(self, name: str) -> Path:
        path = self.logdir / f"{name}-{len(self.logs)}.log"
        self.logs.append(path)
        return path

    def guest(self, vm: int, name: str = "guest") -> ManagedProcess:
        with open(self._log(name), "w") as log:
            p = spawn_guest(self.channel.channel_open(Scope.VM, vm), name, stderr=log)
        self.procs.append(p)
        p.wait_event("attached", timeout=timing.scaled(10))
        return p

    def device(self, dev: int, name: str = "device") -> ManagedProcess:
        with open(self._log(name), "w") as log:
            p = spawn_device(self.channel.channel_open(Scope.DEVICE, dev), name, stderr=log)
        self.procs.append(p)
        p.wait_event("attached", timeout=timing.scaled(10))
        return p

    def broker_fds(self) -> int:
        return int(self.channel.state()["process"]["open_fds"])

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def vmm_factory(
    broker_factory: Callable[..., BrokerHandle], sockdir: Path
) -> Iterator[Callable[..., Vmm]]:
    made: list[Vmm] = []

    def make(broker: BrokerHandle | None = None, **broker_kw: object) -> Vmm:
        b = broker if broker is not None else broker_factory(**broker_kw)
        v = Vmm(b, b.connect(), sockdir)
        made.append(v)
        return v

    yield make
    for v in made:
        v.stop_all()
        for log in v.logs:
            text = log.read_text()
            assert "Traceback" not in text, f"{log.name}:\n{text}"


@pytest.fixture
def vmm(vmm_factory: Callable[..., Vmm]) -> Vmm:
    return vmm_factory()
