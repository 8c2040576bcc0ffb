"""The step model of the conformance scenarios: :class:`Step`, :class:`Scenario` and one
constructor per kind of step (the library itself is :mod:`hostemu.conform.scenarios`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BADFD = "BADFD"
"""A descriptor (kernel) or handle (broker) that is not open: EBADF."""

# Addresses the scenarios use: clear of the in-kernel PIC/ELCR ports, the IOAPIC and
# LAPIC pages, and the oracle's own DONE port.
PORT = 0x500
MMIO = 0xD000_0000


@dataclass(frozen=True)
class Step:
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    deviation: str | None = None
    """The documented deviation or open bug a difference at this step is explained by."""

    def dev(self, name: str) -> Step:
        return dataclasses.replace(self, deviation=name)

    def describe(self) -> str:
        parts = []
        for k, v in self.args.items():
            if v is None or v is False or (k == "vm" and v == "a") or (k == "flags" and not v):
                continue
            if (
                isinstance(v, int)
                and not isinstance(v, bool)
                and k in ("addr", "datamatch", "value", "flags", "gsi")
                and v > 9
            ):
                parts.append(f"{k}={v:#x}")
            elif v is True:
                parts.append(k)
            else:
                parts.append(f"{k}={v}")
        return f"{self.op}({', '.join(parts)})"


@dataclass(frozen=True)
class Scenario:
    name: str
    doc: str
    steps: tuple[Step, ...]
    irqchip: bool = True
    policy: str = "hup"


# ------------------------------------------------------------------ step constructors


def eventfd(name: str, initval: int = 0, *, semaphore: bool = False) -> Step:
    return Step("eventfd", {"name": name, "initval": initval, "semaphore": semaphore})


def memfd(name: str) -> Step:
    return Step("memfd", {"name": name})


def vm(name: str, irqchip: bool = True) -> Step:
    return Step("vm", {"name": name, "irqchip": irqchip})


def irqfd(
    efd: str, gsi: int, *, resample: str | None = None, flags: int = 0, vm: str = "a"
) -> Step:
    return Step("irqfd", {"efd": efd, "gsi": gsi, "resample": resample, "flags": flags, "vm": vm})


def irqfd_deassign(efd: str, gsi: int, *, flags: int = 0, vm: str = "a") -> Step:
    return Step("irqfd_deassign", {"efd": efd, "gsi": gsi, "flags": flags, "vm": vm})


def ioeventfd(
    efd: str,
    addr: int,
    length: int,
    *,
    datamatch: int | None = None,
    pio: bool = False,
    flags: int = 0,
    vm: str = "a",
) -> Step:
    return Step(
        "ioeventfd",
        {
            "efd": efd,
            "addr": addr,
            "len": length,
            "datamatch": datamatch,
            "pio": pio,
            "flags": flags,
            "vm": vm,
        },
    )


def ioeventfd_deassign(
    efd: str,
    addr: int,
    length: int,
    *,
    datamatch: int | None = None,
    pio: bool = False,
    flags: int = 0,
    vm: str = "a",
) -> Step:
    """The same arguments as :func:`ioeventfd`, with DEASSIGN."""
    assign = ioeventfd(efd, addr, length, datamatch=datamatch, pio=pio, flags=flags, vm=vm)
    return Step("ioeventfd_deassign", assign.args)


def write(addr: int, length: int, value: int, *, pio: bool = False) -> Step:
    return Step("write", {"addr": addr, "len": length, "value": value, "pio": pio})


def read(addr: int, length: int, *, pio: bool = False) -> Step:
    return Step("read", {"addr": addr, "len": length, "pio": pio})


def signal(efd: str, n: int = 1) -> Step:
    return Step("signal", {"efd": efd, "n": n})


def take() -> Step:
    """VM ``a``'s guest enables interrupts for a moment: it takes every latched request
    and EOIs it (which de-asserts a resampling irqfd's line and signals its resamplefd),
    then disables them again."""
    return Step("take")


def close(efd: str) -> Step:
    return Step("close", {"efd": efd})


def teardown(vm: str = "a") -> Step:
    return Step("teardown", {"vm": vm})


def scenario(
    name: str, doc: str, *steps: Step, irqchip: bool = True, policy: str = "hup"
) -> Scenario:
    return Scenario(name, doc, tuple(steps), irqchip=irqchip, policy=policy)
